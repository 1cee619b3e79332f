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


class UnitError(IdentityError):
    """One unit's settings are wrong: says which unit (1-based, as the UI shows "Unit 1") and which field.

    ``status_code`` 422: the WebUI's API answers an exception that stops a run (a PhotoMaker prompt
    without its trigger word is found only while the prompt is encoded) with
    ``vars(e).get('status_code', 500)``; a unit's settings are the client's to fix, as at the API gate.
    """

    def __init__(self, unit, field, message):
        self.unit = unit
        self.field = field
        self.reason = message
        self.status_code = 422
        where = "Identity" if unit is None else f"Identity unit {unit}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class PreparationError(IdentityError):
    """A reference picture, or how it should be fitted to the encoder (mode, crop position, pad colour), is unusable."""


class EncoderError(IdentityError):
    """An image encoder could not be loaded or run (wrong file, wrong output asked for, bad settings)."""


class PatchError(IdentityError):
    """Image prompts could not be applied to the loaded UNet (wrong inputs or an unexpected model)."""
