"""Find (and replace) one field of a multipart/form-data body, without parsing the rest.

Audio transcriptions and image edits carry their `model` as a form field beside a file of many
megabytes: only the field's bytes are located and rewritten, the file is never copied apart.
Anything malformed is simply "not found": the caller answers the client, never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FormField", "boundary_of", "find_form_field"]

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.I)
_NAME = re.compile(rb'^content-disposition:\s*form-data;.*?\bname="([^"]*)"', re.I | re.M)


@dataclass(frozen=True, slots=True)
class FormField:
    value: str
    start: int  # byte offsets of the value
    end: int


def boundary_of(content_type: bytes) -> bytes | None:
    """The boundary of a `multipart/form-data; boundary=…` content type, or None."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    match = _BOUNDARY.search(content_type)
    return match.group(1) if match else None


def find_form_field(body: bytes, boundary: bytes, name: str) -> FormField | None:
    """The first part named `name`, when its value is short UTF-8 text (a model id)."""
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    while position >= 0:
        head_start = body.find(b"\r\n", position) + 2
        if head_start < 2:
            return None
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return None
        following = body.find(b"\r\n" + delimiter, head_end)
        if following < 0:
            return None
        match = _NAME.search(body[head_start:head_end])
        if match and match.group(1) == name.encode():
            start, end = head_end + 4, following
            if end - start > 512:
                return None
            try:
                return FormField(body[start:end].decode("utf-8"), start, end)
            except UnicodeDecodeError:
                return None
        position = following + 2
    return None
