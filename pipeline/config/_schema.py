"""Building blocks of the study-file schema (pipeline/config.py, pipeline/space.py): strict
scalars, the frozen base model, and validation errors placed at a key path below a model."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Strict
from pydantic_core import PydanticCustomError

# Strict scalars: pydantic's lax mode reads `true` as 1 and `1` as True; a study file means what it says.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # still takes whole numbers (lr: 1)
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


class Frozen(BaseModel):
    """Base of every study-file section: unknown keys are errors, and a loaded study is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def fail(at: str, message: str) -> PydanticCustomError:
    """A validation error placed at the dotted sub-path `at` below the model being validated
    (pydantic puts model-level errors on the model itself; `studyfile.describe` appends `at`)."""
    return PydanticCustomError("sweep", "{message}", {"message": message, "at": at})
