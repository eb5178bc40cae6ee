"""Action shapes that several resources share: a bulk action on the ticked records or on every
record a filter matches, deleting one record once confirmed, and one verb on a queue or job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from gae_deferred import admin

from ... import _templates
from ..base import PREFIX, AdminHandler, bulk_summary, plural


def act_on_selected(
    handler: AdminHandler, noun: str, back: str, apply: Callable[..., admin.BulkResult]
) -> None:
    """The form's ``action`` on the records ticked on a list page (``ids``), confirmed first
    (HTML); ``noun`` names one record ("failure")."""
    action, ids, version = handler.field("action"), handler.fields("ids"), handler.field("version")
    if not ids:
        raise admin.BadRequest(f"select at least one {noun}")
    what = f"{action.capitalize()} {plural(len(ids), noun)}"
    if handler.needs_confirmation(
        f"{what}?", back, what, danger=action == "delete", action=action, ids=ids, version=version
    ):
        return
    result = apply(action, ids, handler.actor, version=version)
    handler.finish(
        bulk_summary(action, result, f"{noun}s"),
        back,
        {"done": result.done, "errors": result.errors},
    )


def delete_one(
    handler: AdminHandler,
    noun: str,
    record_id: str,
    delete: Callable[[Any, str], None],
    *,
    question: str,
    cancel: str,
    after: str,
) -> None:
    """Delete one record once the HTML form confirmed ``question``; then back to ``after``."""
    if handler.needs_confirmation(question, cancel, f"Delete 1 {noun}", danger=True):
        return
    delete(record_id, handler.actor)
    handler.finish(f"Deleted {noun} {record_id}.", after)


class OneVerb(AdminHandler):
    """``admin.<verb>_<noun>(name, actor)`` on the queue or job of the URL, for each verb of
    ``verbs``; a verb with a question there is confirmed first (HTML)."""

    noun: ClassVar[str] = ""
    verbs: ClassVar[dict[str, str | None]] = {}

    @classmethod
    def verb_pattern(cls) -> str:
        """The route's last segment: one of the verbs, passed to the handler as ``verb``."""
        return f"(?P<verb>{'|'.join(cls.verbs)})"

    def act(self, segment: str, name: str, verb: str) -> None:
        back = f"{PREFIX}/{self.noun}s/{segment}"
        question = self.verbs[verb]
        if question and self.needs_confirmation(
            question.format(name=name),
            back,
            f"{verb.capitalize()} {self.noun} {name}",
            danger=True,
        ):
            return
        result = getattr(admin, f"{verb}_{self.noun}")(name, self.actor)
        shown, data = self.outcome(name, result)
        self.finish(f"{self.noun.capitalize()} {shown}: {verb} done.", back, data)

    def outcome(self, name: str, result: Any) -> tuple[str, dict[str, Any]]:
        """The record's name for the message, and the data the API answers with."""
        return name, {}


class BulkMatching(AdminHandler):
    """An action on every record a filter matches: the count is confirmed first (HTML)."""

    filter_type: ClassVar[type[admin.FailureFilter] | type[admin.SpillFilter]]
    list_path: ClassVar[str]
    apply: ClassVar[Any]

    def post(self) -> None:
        """HTML: the confirmation page carries the count it showed (``expected``), and the
        action runs only while exactly that many records match, on the ids read then; a
        different count asks again. The API acts on what matches, or with ``expected`` in
        its body only on exactly that many (409 otherwise)."""
        wanted = self.filter_type.parse(self.posted())
        action, version = self.field("action"), self.field("version")
        back = f"{PREFIX}{self.list_path}" + _templates.query(wanted.params())
        expected = self._expected()
        if not self.json_api and (self.field("confirm") != "yes" or expected is None):
            self._askcount(action, version, wanted, back, admin.count_matching(wanted))
            return
        try:
            result = type(self).apply(
                action, wanted, self.actor, version=version, expected=expected
            )
        except admin.CountChanged as exc:
            if self.json_api:
                raise
            self._askcount(action, version, wanted, back, exc.count, changed=exc.expected)
            return
        self.finish(
            bulk_summary(action, result, wanted.describe()),
            back,
            {"done": result.done, "errors": result.errors},
        )

    def _expected(self) -> int | None:
        """The confirmed count (field ``expected``), None when absent."""
        value = self.field("expected")
        if not value:
            return None
        if not (value.isascii() and value.isdigit() and len(value) <= 5):
            raise admin.BadRequest(f"expected must be a number of records, not {value[:20]!r}")
        return int(value)

    def _askcount(
        self,
        action: str,
        version: str,
        wanted: admin.FailureFilter | admin.SpillFilter,
        back: str,
        count: int,
        changed: int | None = None,
    ) -> None:
        shown = f"{count}{'+' if count >= admin.MAX_MATCHING else ''}"
        state = "" if wanted.state == "all" else f"{wanted.state} "
        noun = "failure" if isinstance(wanted, admin.FailureFilter) else "spilled payload"
        note = (
            f"The number of matching records changed from {changed} to {count}: nothing was "
            "done yet. "
            if changed is not None
            else ""
        )
        self.ask(
            f"{note}{action.capitalize()} {shown} {wanted.describe()}? At most "
            f"{admin.MAX_MATCHING:,} are done, {admin.MAX_BULK} at a time.",
            back,
            f"{action.capitalize()} {plural(shown, state + noun)}",
            danger=action == "delete",
            action=action,
            version=version,
            expected=str(count),
            **wanted.params(),
        )
