"""How the directory tells a node on whose behalf it calls.

The directory authenticates the end user (their own certificate on the connection to the
directory) and passes that identity with each node call as metadata. A node believes it
only from the directory's certificate (node/access.py). The access-policy work replaces
this with the end user's own signed assertion, carried the same way.
"""

from __future__ import annotations

from dmp.identity import Principal

ON_BEHALF_OF = "x-dmp-on-behalf-of"
ON_BEHALF_NAME = "x-dmp-on-behalf-name-bin"
ON_BEHALF_PROFESSION = "x-dmp-on-behalf-profession"


def relay_metadata(subject: Principal) -> tuple[tuple[str, str | bytes], ...]:
    """Metadata naming the end user a relayed call is for (the name in UTF-8)."""
    return (
        (ON_BEHALF_OF, subject.uri),
        (ON_BEHALF_NAME, subject.name.encode()),
        (ON_BEHALF_PROFESSION, subject.profession),
    )
