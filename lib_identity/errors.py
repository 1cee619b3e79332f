"""Exceptions whose message is written for the person who has to act on it."""


class IdentityError(Exception):
    """Base class: the message alone must tell a user what went wrong and what to do."""


class CheckpointError(IdentityError):
    """A model file could not be read or is not an identity checkpoint."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelNotFoundError(IdentityError):
    """A model was asked for by name and no configured model folder holds it."""


class PreparationError(IdentityError):
    """A reference picture, or how it should be fitted to the encoder (mode, crop position, pad colour), is unusable."""


class EncoderError(IdentityError):
    """An image encoder could not be loaded or run (wrong file, wrong output asked for, bad settings)."""


class PatchError(IdentityError):
    """Image prompts could not be applied to the loaded UNet (wrong inputs or an unexpected model)."""
