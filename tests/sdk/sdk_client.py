#!/usr/bin/env python3
"""Drives the SMS emulator with the official Python SDK (huaweicloudsdksms), the reference client.

The SDK signs every request with its own SDK-HMAC-SHA256 signer, so a run that passes shows the
emulator checks signatures the way the API gateway does, and that its bodies parse in the SDK's
models. Usage: sdk_client.py URL AK SK [create-block-task SOURCE_ID MIGRATION_IP NAME:SIZE... |
network-check TASK_ID].
Exits non-zero on any failure.
"""
import json
import sys
import time

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions import exceptions
from huaweicloudsdkcore.http.http_config import HttpConfig
import huaweicloudsdksms.v3 as sms


def client_for(url, ak, sk):
    cfg = HttpConfig.get_default_config()
    cfg.ignore_ssl_verification = True
    cfg.retry_times = 0
    return (
        sms.SmsClient.new_builder()
        .with_http_config(cfg)
        .with_credentials(BasicCredentials(ak, sk, "emulatorproject"))
        .with_endpoints([url])
        .build()
    )


def create_block_task(url, ak, sk, source_id, migration_ip, disks):
    """Creates a MIGRATE_BLOCK task of the source disks DISKS (NAME:SIZE) as the SDK
    sends it: reference 5.4.1 TargetDisks (table 5-114, line 9742) has no relation_name, so the
    service picks the target ECS disks. Prints the task id."""
    client = client_for(url, ak, sk)
    target_disks = []
    for i, d in enumerate(disks):
        name, size = d.rsplit(":", 1)
        target_disks.append(sms.TargetDisks(name=name, device_use="BOOT" if i == 0 else "NORMAL",
                                            size=int(size), used_size=0, physical_volumes=[]))
    task = sms.PostTask(
        name="sdk-block", type="MIGRATE_BLOCK", os_type="LINUX", migration_ip=migration_ip,
        region_name="emulator", region_id="emulator", project_name="emulator", project_id="p",
        source_server=sms.SourceServerByTask(id=source_id),
        target_server=sms.TargetServerByTask(name="target", disks=target_disks),
    )
    task_id = client.create_task(sms.CreateTaskRequest(body=task)).id
    shown = client.show_task(sms.ShowTaskRequest(task_id=task_id))
    for d in shown.target_server.disks:
        print("disk", d.name, d.relation_name)
    print("task", task_id)


def network_check(url, ak, sk, task_id):
    """The operator's network_check action (reference 5.4.7, line 12922), then the task as the
    SDK reads it until its network_check_info (5.4.5, line 11283) appears; prints it as JSON."""
    client = client_for(url, ak, sk)
    client.update_task_status(sms.UpdateTaskStatusRequest(
        task_id=task_id, body=sms.UpdateTaskStatusReq(operation="network_check")))
    deadline = time.time() + 120
    while time.time() < deadline:
        info = client.show_task(sms.ShowTaskRequest(task_id=task_id)).network_check_info
        if info is not None:
            print(json.dumps(info.to_dict()))
            return
        time.sleep(0.5)
    raise AssertionError("no network_check_info on the task within 120 s")


def main():
    if len(sys.argv) > 5 and sys.argv[4] == "network-check":
        network_check(*sys.argv[1:4], sys.argv[5])
        return
    if len(sys.argv) > 4 and sys.argv[4] == "create-block-task":
        create_block_task(*sys.argv[1:4], sys.argv[5], sys.argv[6], sys.argv[7:])
        return
    url, ak, sk = sys.argv[1:4]
    cfg = HttpConfig.get_default_config()
    cfg.ignore_ssl_verification = True
    cfg.retry_times = 0
    client = (
        sms.SmsClient.new_builder()
        .with_http_config(cfg)
        .with_credentials(BasicCredentials(ak, sk, "emulatorproject"))
        .with_endpoints([url])
        .build()
    )

    body = sms.PostSourceServerBody(
        name="sdk-source", ip="192.0.2.10", hostname="sdk-host", os_type="LINUX",
        os_version="CENTOS_7_6_64BIT", linux_block_check="{}", firmware="BIOS", cpu_quantity=2,
        memory=4294967296, kernel_version="3.10.0", agent_version="0.1.0", boot_loader="GRUB",
        has_rsync=True, has_tc=True, paravirtualization=False, raw_devices="", start_type="MANUAL",
        io_read_wait=1.0, platform="other", btrfs_list=[], volume_groups=[],
        networks=[sms.NetWork(name="eth0", ip="192.0.2.10", netmask="255.255.255.0",
                              gateway="192.0.2.1", mtu=1500, mac="0" * 64)],
        disks=[sms.ServerDisk(name="/dev/vda", partition_style="MBR", device_use="BOOT",
                              size=42949672960, used_size=42948624384, physical_volumes=[])],
    )
    source_id = client.register_server(sms.RegisterServerRequest(body=body)).id
    assert source_id, "no source id"

    listed = client.list_servers(sms.ListServersRequest(name="sdk-source"))
    assert any(s.id == source_id for s in listed.source_servers), "source not listed"

    task = sms.PostTask(
        name="sdk-task", type="MIGRATE_BLOCK", os_type="LINUX", migration_ip="192.0.2.20",
        region_name="emulator", region_id="emulator", project_name="emulator", project_id="p",
        source_server=sms.SourceServerByTask(id=source_id),
        target_server=sms.TargetServerByTask(name="target", disks=[
            sms.TargetDisks(name="/dev/sda", device_use="BOOT", size=42949672960, used_size=0)]),
    )
    task_id = client.create_task(sms.CreateTaskRequest(body=task)).id
    shown = client.show_task(sms.ShowTaskRequest(task_id=task_id))
    assert shown.state == "READY", shown.state
    # Reference 5.4.5 (example lines 1238-1239): `name` stays the source disk, `relation_name`
    # is the disk of the target ECS.
    disk = shown.target_server.disks[0]
    assert (disk.name, disk.relation_name) == ("/dev/sda", "/dev/vda"), shown.target_server

    client.update_task_status(sms.UpdateTaskStatusRequest(
        task_id=task_id, body=sms.UpdateTaskStatusReq(operation="start")))
    cmd = client.show_command(sms.ShowCommandRequest(server_id=source_id))
    assert cmd.command_name == "START" and cmd.command_param.task_id == task_id, cmd

    # A wrong secret key must be refused.
    bad = (
        sms.SmsClient.new_builder().with_http_config(cfg)
        .with_credentials(BasicCredentials(ak, sk + "x", "emulatorproject")).with_endpoints([url]).build()
    )
    try:
        bad.show_task(sms.ShowTaskRequest(task_id=task_id))
        raise AssertionError("a wrong SK was accepted")
    except exceptions.ClientRequestException as e:
        assert e.status_code == 401, e.status_code
    print("ok", source_id, task_id)


if __name__ == "__main__":
    main()
