"""The deployment forms, by the name ``export.forms`` uses. One line per form: a new form or
back end (TensorRT engines, a GPU runtime) is its own module plus a line here; the config's
``export`` section, the builder, the bench and the report all read this registry."""
from __future__ import annotations

from exporters.forms.base import BuildContext, Form
from exporters.forms.bound import Bound
from exporters.forms.branch import Branch, BranchSwitch
from exporters.forms.edge import Fp16, Int8
from exporters.forms.live import Live
from exporters.forms.merged import Merged
from exporters.forms.rows import Rows
from exporters.forms.shared import Shared
from exporters.forms.switch import Switch

FORMS: dict[str, type[Form]] = {form.name: form for form in (
    Merged,
    Shared,
    Rows,
    Switch,
    Live,
    Bound,
    Branch,
    BranchSwitch,
    Fp16,
    Int8,
)}
# merged is always built: every other form is checked against it
OPTIONAL = [name for name in FORMS if name != "merged"]

__all__ = ["FORMS", "OPTIONAL", "Form", "BuildContext"]
