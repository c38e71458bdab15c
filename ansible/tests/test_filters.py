"""Unit tests of the collection's filter plugins, on the real functions (run by lint.sh)."""

import importlib.util
import os
import sys
import tomllib
import unittest

from ansible.errors import AnsibleFilterError

HERE = os.path.dirname(os.path.abspath(__file__))
FILTERS = os.path.join(HERE, "..", "ansible_collections", "sms_agent", "fleet", "plugins", "filter")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(FILTERS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


agent_toml = load("agent_toml").agent_toml
report = load("inventory_report")


class AgentToml(unittest.TestCase):
    def test_round_trips_through_a_toml_parser(self):
        settings = {
            "api": {"endpoint": "https://sms.example", "proxy": "", "ca_file": None},
            "agent": {"name": 'web "01" \\ \t\x01\x7f é 😀', "poll_interval": "10s"},
            "transfer": {"port": 8900, "streams": 6, "exclude": ["/srv/cache", "/tmp"]},
            "extra": {"flag": False, "ratio": 0.5, "none": []},
        }
        text = agent_toml(settings)
        back = tomllib.loads(text)
        self.assertEqual(back["agent"]["name"], settings["agent"]["name"])
        self.assertEqual(back["transfer"], settings["transfer"])
        self.assertEqual(back["extra"], {"flag": False, "ratio": 0.5})
        # Unset values are left out, so the agent's defaults apply.
        self.assertEqual(back["api"], {"endpoint": "https://sms.example"})
        self.assertNotIn("probe", tomllib.loads(agent_toml({"probe": {"devices": []}, "api": {}})))

    def test_tables_inside_a_section_are_refused_by_name(self):
        with self.assertRaisesRegex(AnsibleFilterError, r"\[agent\] name is a dict"):
            agent_toml({"agent": {"name": {"x": 1}}})
        with self.assertRaisesRegex(AnsibleFilterError, r"\[api\] timeout is nan"):
            agent_toml({"api": {"timeout": float("nan")}})


class InventoryReport(unittest.TestCase):
    def test_probed_missing_and_unreachable_hosts(self):
        probe = (
            '{"name": "web01", "ip": "10.0.0.5", "os_version": "DEBIAN_12_64BIT", "kernel_version": "6.1.0",'
            ' "firmware": "UEFI", "cpu_quantity": 4, "memory": 8589934592,'
            ' "disks": [{"size": 21474836480, "physical_volumes": [{"used_size": 1073741824}]}],'
            ' "volume_groups": [{"logical_volumes": [{"used_size": 1073741824}]}]}'
        )
        hostvars = {
            "web01": {
                "_sms_agent_probe": {"rc": 0, "stdout": probe},
                "_sms_agent_status": {"rc": 0, "stdout": '{"running": true, "source_id": "src-1"}'},
            },
            "bare": {
                "_sms_agent_probe": {"rc": 127, "stdout": "", "stderr": "sh: 1: exec: sms-agent: not found"},
                "_sms_agent_status": {"rc": 127, "stdout": "", "stderr": "not found"},
            },
        }
        r = report.inventory_report(["web01", "bare", "down"], hostvars)
        self.assertEqual(r["hosts"]["web01"]["probe"]["name"], "web01")
        self.assertIn("not found", r["hosts"]["bare"]["error"])
        self.assertIn("unreachable", r["hosts"]["down"]["error"])
        lines = report.inventory_table(r).splitlines()
        self.assertTrue(lines[0].startswith("HOST"))
        web = next(line for line in lines if line.startswith("web01"))
        for cell in ["10.0.0.5", "DEBIAN_12_64BIT", "UEFI", "8.0G", "1 / 20.0G", "2.0G", "src-1"]:
            self.assertIn(cell, web)
        # Columns line up: every cell of a column starts at the header's offset.
        self.assertEqual(web.index("10.0.0.5"), lines[0].index("IP"))
        self.assertIn("3 hosts, 1 probed, 2 not", lines[-1])


if __name__ == "__main__":
    unittest.main()
