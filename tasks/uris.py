"""How oncoflow spells local files as URIs, and reads `file://` URIs back (RFC 8089): the spelling of the
`image_uri` column. Standard library only: the CLI checks its location arguments with it before any work.
"""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes


def printable_path(path: str) -> str:
    """A local path as valid UTF-8 text, one text per path: `%` becomes %25 and bytes that are not UTF-8
    (kept by Python as surrogates) become %XX; everything else is kept as is (spaces, `#`, `?`).

    Without the %25, `bad\\xffname.png` and a file literally named `bad%FFname.png` would share a URI, and
    the second would never be classified. `urllib.parse.unquote_to_bytes` gives the path's bytes back.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _percent_encode_invalid(os.fsencode(path))
    return path.replace("%", "%25")


def full_file_uri(value: str) -> str:
    """`file:/abs/path` (RFC 8089's short form; Java and Spark write it) as `file:///abs/path`; any
    other value as given."""
    if value[:5].lower() == "file:" and value[5:6] == "/" and value[5:7] != "//":
        return "file://" + value[5:]
    return value


def file_uri_path(uri: str) -> str | None:
    """The local path a `file://` URI names (RFC 8089), its %XX escapes decoded: `file:///p` and
    `file://localhost/p` are `/p`. None for another host (`file://server/share`) or no path at all."""
    host, slash, path = uri[len("file://") :].partition("/")
    if host.lower() not in {"", "localhost"} or not slash:
        return None
    return os.fsdecode(unquote_to_bytes("/" + path))


def canonical_file_uri(uri: str) -> str:
    """A `file://` URI spelled the way classify writes image_uri: its %XX escapes decoded, then the path
    re-encoded by printable_path. `Path.as_uri()` (`%20` for a space) and oncoflow's own spelling give the
    same text, so labels written either way match the rows. `file://localhost/p` (RFC 8089) is `file:///p`;
    a URI naming another host is kept as given (it matches no row classify wrote)."""
    path = file_uri_path(uri)
    return uri if path is None else "file://" + printable_path(path)


def _percent_encode_invalid(raw: bytes) -> str:
    text: list[str] = []
    position = 0
    while position < len(raw):
        try:
            text.append(raw[position:].decode("utf-8").replace("%", "%25"))
            break
        except UnicodeDecodeError as exc:
            text.append(raw[position : position + exc.start].decode("utf-8").replace("%", "%25"))
            text.extend(f"%{byte:02X}" for byte in raw[position + exc.start : position + exc.end])
            position += exc.end
    return "".join(text)
