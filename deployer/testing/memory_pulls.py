"""``POST /images/create`` (a pull) of the in-memory Docker engine: the answer dockerd 20.10
gives, an error status before the stream or a 200 stream of JSON lines (with the error as a line
of it), held as long as a test holds the registry (see
:meth:`~deployer.testing.memory_registry.RegistryState.slow_pull`).

By tag (``fromImage=repo&tag=qa``) a pull brings what the tag holds now and tags it; by digest
(``fromImage=repo&tag=sha256:…``) it brings that build, whichever tag held it, and only adds
``repo@sha256:…`` to the image's ``RepoDigests``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from deployer.reference import InvalidReference, check_tag, parse_reference, split
from deployer.testing.memory_common import IMAGE_SIZE, ApiError, digest_of
from deployer.testing.memory_registry import Gate, PullRecord
from deployer.testing.memory_state import EngineState

log = Logger()

#: What dockerd takes for a digest in the ``tag`` parameter (else it is a tag).
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _arg(request: IRequest, name: str) -> str | None:
    args = getattr(request, "args", {}) or {}
    values = args.get(name.encode())
    return values[0].decode() if values else None


class Pulls:
    """The pull endpoint of one engine; counts the pulls in progress."""

    def __init__(self, engine: EngineState) -> None:
        self._engine = engine
        self.in_progress = 0
        self.max_in_progress = 0

    def answer(self, request: Request) -> Deferred[Any]:
        engine = self._engine
        from_image = _arg(request, "fromImage")
        if not from_image:
            raise ApiError(400, "MemoryDocker only pulls: fromImage is required")
        tag = _arg(request, "tag") or ""
        try:
            ref = parse_reference(from_image)
            digest = tag if _DIGEST.match(tag) else None  # dockerd's "tag" may be a digest
            if tag and digest is None:
                check_tag(tag)
        except InvalidReference as e:
            raise ApiError(400, f"invalid reference format: {e}") from e
        if digest is None and not tag and ref.digest is not None:
            digest = ref.digest
        if digest is not None:  # that build, tagging nothing
            repotags = [f"{ref.name}@{digest}"]
        elif tag or ref.tag:
            repotags = [f"{ref.name}:{tag or ref.tag}"]
        else:  # no tag at all: the engine pulls every tag of the repository
            repotags = sorted(r for r in engine.remote if split(r)[0] == ref.name)
            if not repotags:
                repotags = [f"{ref.name}:latest"]
        auth = request.getHeader(b"X-Registry-Auth")
        for repotag in repotags:
            engine.pulls.append(PullRecord(repotag, auth.decode() if auth else None))
        for repotag in repotags:  # errors before the stream starts
            failure = engine.pull_failure(repotag, before_stream=True)
            if failure is not None:
                raise ApiError(failure.status or 500, failure.message)
            if engine.build_for(repotag) is None and not engine.has_failure(repotag):
                raise ApiError(404, f"manifest for {repotag} not found: manifest unknown:"
                                    " manifest unknown")
        request.setHeader(b"Content-Type", b"application/json")
        self.in_progress += 1
        self.max_in_progress = max(self.max_in_progress, self.in_progress)
        d: Deferred[Any] = Deferred.fromCoroutine(self._stream(request, ref.path, repotags))
        d.addBoth(self._ended, request, repotags)
        if not d.called:
            # The answer ends later, outside any agent's pump: push it through when it does.
            request.notifyFinish().addBoth(lambda _: engine._deliver())
        return d

    def _ended(self, result: object, request: IRequest, repotags: list[str]) -> object:
        self.in_progress -= 1
        if isinstance(result, Failure) and result.check(CancelledError):
            # The client went away (Klein cancels the answer): nothing more to write.
            self._engine.pulls_abandoned.extend(repotags)
            return result
        if isinstance(result, Failure):
            log.failure("MemoryDocker: the pull stream broke", result)
            message = f"MemoryDocker: the pull stream broke: {result.getErrorMessage()}"
            request.write(json.dumps({"errorDetail": {"message": message}, "error": message},
                                     separators=(",", ":")).encode() + b"\n")
        return b""

    @staticmethod
    async def _held(gate: Gate, line: Callable[[Mapping[str, Any]], None]) -> bool:
        """Wait for ``gate``; False when it opened with an error (then sent as an error line)."""
        try:
            await gate.wait()
        except CancelledError:
            raise
        except Exception as e:
            line({"errorDetail": {"message": str(e)}, "error": str(e)})
            return False
        return True

    async def _stream(self, request: IRequest, path: str, repotags: list[str]) -> None:
        engine = self._engine

        def line(obj: Mapping[str, Any]) -> None:
            request.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        shown_path = path if "/" in path else "library/" + path
        for repotag in repotags:
            name, tag, digest = split(repotag)
            gate = engine.gate(repotag)
            if gate is not None and not gate.answer:
                if not await self._held(gate, line):
                    return
            line({"status": f"Pulling from {shown_path}", "id": digest or tag})
            if gate is not None and gate.answer:
                if not await self._held(gate, line):
                    return
            failure = engine.pull_failure(repotag, before_stream=False)
            remote = engine.build_for(repotag)
            local = engine.find_image(repotag)
            if failure is not None or remote is None:
                message = failure.message if failure is not None else "manifest unknown"
                layer = digest_of("layer", repotag)[7:19]
                line({"status": "Pulling fs layer", "progressDetail": {}, "id": layer})
                line({"status": "Downloading", "progressDetail": {}, "id": layer})
                line({"errorDetail": {"message": message}, "error": message})
                return
            fresh = local is None or local.id != remote.image_id
            if fresh:
                for layer_line in _layer_lines(digest_of("layer", remote.image_id)[7:19]):
                    line(layer_line)
            engine.pulled(remote, repotag, name)
            line({"status": f"Digest: {remote.digest}"})
            status = "Downloaded newer image" if fresh else "Image is up to date"
            line({"status": f"Status: {status} for {repotag}"})


def _layer_lines(layer: str) -> Iterator[dict[str, Any]]:
    size = IMAGE_SIZE // 2
    bar = "[==================================================>]"
    yield {"status": "Pulling fs layer", "progressDetail": {}, "id": layer}
    yield {"status": "Downloading", "progressDetail": {"current": 32768, "total": size},
           "progress": "[=>                                                 ]  32.77kB/1.065MB",
           "id": layer}
    yield {"status": "Downloading", "progressDetail": {"current": size, "total": size},
           "progress": f"{bar}  1.065MB/1.065MB", "id": layer}
    yield {"status": "Verifying Checksum", "progressDetail": {}, "id": layer}
    yield {"status": "Download complete", "progressDetail": {}, "id": layer}
    yield {"status": "Extracting", "progressDetail": {"current": size, "total": size},
           "progress": f"{bar}  1.065MB/1.065MB", "id": layer}
    yield {"status": "Pull complete", "progressDetail": {}, "id": layer}


__all__ = ["Pulls"]
