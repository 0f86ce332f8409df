"""Errors a user can fix. The CLI prints the message (one line) and exits 1; `--debug` shows the traceback.

Every message names the file or value at fault and says what to do about it.
"""


class OatoError(Exception):
    """Base of every error a user can fix."""


class ModelFileError(OatoError):
    """A model file is missing, not a GGUF, or damaged."""


class ArtifactError(OatoError):
    """A JSON artifact (plan, profile, inventory) is unreadable, of another schema version, or inconsistent."""


class PlanMismatchError(OatoError):
    """A plan was made for another model, device set or llama.cpp build than the one at hand."""


class LoadError(OatoError):
    """llama.cpp could not load a model the way a plan says, or loaded it differently."""


class BackendError(OatoError):
    """The llama.cpp build at hand lacks a device or feature that was asked for."""


class PlanError(OatoError):
    """A plan that cannot be applied as written."""


class PlanInfeasibleError(OatoError):
    """The budget cannot hold any GPU placement."""


class SolverError(OatoError):
    """CBC did not return an optimal solution."""


class ProfileError(OatoError):
    """The profile could not be measured, or no profile fits this machine."""


class RpcError(OatoError):
    """An RPC server that does not answer, speaks another protocol, or has no rpc-server binary for this build."""


class BuildError(OatoError):
    """The patched library could not be built."""


class OutputError(OatoError):
    """An output path oatoplan will not write (an input of the command, not a regular file, a link, a file of
    another kind) or could not write (no space, no permission); the file there is left as it was."""
