"""Typed errors. Every error a user can cause is a subclass of PetsError and names what was wrong."""

from __future__ import annotations


class PetsError(Exception):
    """Base of every error this package raises on bad input or state."""


class TaskNameError(PetsError, ValueError):
    """A task name that could escape the artifact directory or is otherwise unusable."""


class UnknownTaskError(PetsError, KeyError):
    """A request or command named a task that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown task"


class DuplicateTaskError(PetsError, ValueError):
    """add_task with a name that is already loaded."""


class TaskSourceError(PetsError, ValueError):
    """A task source (peft dir, fine-tune, native dir) that cannot be read or does not fit the base."""


class UnsafeCheckpointError(TaskSourceError):
    """A checkpoint that can only be read by running pickle code."""


class CheckpointFormatError(TaskSourceError):
    """A corrupt or malformed weights file (safetensors header, offsets, values)."""


class BaseModelError(PetsError, ValueError):
    """The base checkpoint directory cannot be used."""


class InputError(PetsError, ValueError):
    """A request whose ids, mask, shapes or text cannot be run."""


class ArtifactError(PetsError, ValueError):
    """A compiled artifact that is missing, corrupt, or from another format version."""


class SiteNotServedError(PetsError, ValueError):
    """add_task needs a task op at a site the compiled program does not serve."""


class CompileError(PetsError, RuntimeError):
    """A graph pass failed; the message names the pass and the ones before it."""


class TaskRemovedError(UnknownTaskError):
    """A request's task was removed after the request was accepted and before it ran."""


class QueueFullError(PetsError, RuntimeError):
    """Engine.submit with the queue at max_queue: the request was not accepted."""


class RequestTimeoutError(PetsError, TimeoutError):
    """An accepted request whose timeout passed before it ran; it never runs later."""


class RequestCancelledError(PetsError, RuntimeError):
    """An accepted request the engine dropped unrun (Engine.close(cancel_pending=True))."""


class EngineClosedError(PetsError, RuntimeError):
    """Engine.submit after close()."""


class ExportError(PetsError, ValueError):
    """An artifact or option the ONNX export cannot take: an op without a translation, an opset out of range."""
