"""A task module whose import fails."""

import fedge_no_such_dependency  # noqa: F401
