"""A service that runs one coroutine loop for as long as it runs.

:class:`LoopService` starts :meth:`~LoopService._run` when the service starts and cancels it when
the service stops; :meth:`~LoopService.stopService` fires once the loop has ended. The loop
watches ``self.running`` to end on its own. A loop that fails (a defect: loops handle their
errors themselves) is handed to :meth:`~LoopService._crashed`, which logs it; its cancellation
is no failure.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class LoopService(Service):
    """Runs :meth:`_run` from :meth:`startService` until :meth:`stopService` (see the module
    docstring). Subclasses write :meth:`_run`, and :meth:`_crashed` to say what failed."""

    _loop: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._ended)

    def stopService(self) -> Deferred[None]:
        """Cancel the loop; fires once it has ended."""
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is None:
            return succeed(None)
        loop.cancel()
        return loop

    async def _run(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no loop")

    def _ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self._crashed(failure)

    def _crashed(self, failure: Failure) -> None:
        """The loop failed: log it."""
        log.failure("the loop of {service!r} failed", failure, service=self)
