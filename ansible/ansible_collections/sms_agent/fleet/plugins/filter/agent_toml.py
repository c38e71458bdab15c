"""agent_toml: renders the role's settings as /etc/sms-agent/agent.toml.

A filter rather than a Jinja template because TOML's string rules (which control characters
must be escaped, no surrogate escapes) are easy to get subtly wrong in Jinja, and a value the
agent would misread must fail the play here, naming the key, not on the host.
"""

import math

from ansible.errors import AnsibleFilterError

# Escapes TOML basic strings define; every other control character goes out as \\u00XX.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(s):
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u%04X" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(where, v):
    # bool before int: True is an int in Python.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise AnsibleFilterError("sms_agent: %s is %r, which agent.toml cannot hold" % (where, v))
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value("%s[%d]" % (where, i), x) for i, x in enumerate(v)) + "]"
    raise AnsibleFilterError(
        "sms_agent: %s is a %s; agent.toml settings are strings, numbers, booleans or lists of them"
        % (where, type(v).__name__)
    )


def _unset(v):
    return v is None or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def agent_toml(settings):
    """{section: {key: value}} as TOML tables; unset values (None, "", []) are left out, and so
    are sections left empty."""
    if not isinstance(settings, dict):
        raise AnsibleFilterError("sms_agent: the settings must be a mapping of sections")
    lines = []
    for section, keys in settings.items():
        if not isinstance(keys, dict):
            raise AnsibleFilterError("sms_agent: section [%s] must be a mapping of keys" % section)
        body = [
            "%s = %s" % (key, _value("[%s] %s" % (section, key), value))
            for key, value in keys.items()
            if not _unset(value)
        ]
        if body:
            lines += ["", "[%s]" % section] + body
    return "\n".join(lines) + "\n"


class FilterModule:
    """The agent.toml renderer."""

    def filters(self):
        return {"agent_toml": agent_toml}
