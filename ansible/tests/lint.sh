#!/usr/bin/env bash
# The cheap checks of the sms_agent.fleet collection, run by CI (.ci/run): ansible-lint with the
# production profile, a syntax check of every playbook, and the unit tests of the collection's
# filters (agent.toml rendering read back by Python's TOML parser, the report table). ansible-core
# and ansible-lint come from PyPI, pinned in ansible/requirements.txt, into a virtualenv
# ($FLEET_VENV, default /opt/sms-agent-ansible). The full run against real hosts is run.sh.
set -euo pipefail
ANS=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FLEET_VENV:-/opt/sms-agent-ansible}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$ANS/requirements.txt"
export PATH=$VENV/bin:$PATH PYTHONWARNINGS=ignore ANSIBLE_NOCOLOR=1
cd "$ANS"
ansible-lint --profile production --nocolor
for pb in ansible_collections/sms_agent/fleet/playbooks/*.yml; do
  ansible-playbook --syntax-check -i localhost, "$pb" >/dev/null
  echo "syntax ok: $pb"
done
python -m unittest discover -s tests -p 'test_*.py'
