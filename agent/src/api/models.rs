//! Request and response bodies of the agent-side SMS API calls (docs/sms-api.md §3), with the SDK's
//! JSON names. Responses are read leniently: unknown fields are ignored and missing ones default,
//! because the service adds fields over time and an agent in the field must not break on them.

use serde::{Deserialize, Serialize};

pub use probe::model::{BtrfsFileSystem, PostSourceServerBody, ServerDisk, VolumeGroups};

/// `{id}` returned by `POST /v3/sources`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdResponse {
    /// Source id.
    #[serde(default)]
    pub id: String,
}

/// Body of `PUT /v3/sources/{id}/diskinfo` (note the spelling `volumegroups`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disks.
    pub disks: Vec<ServerDisk>,
    /// Volume groups.
    pub volumegroups: Vec<VolumeGroups>,
    /// Btrfs filesystems (absent from the complete first block of the reference's example,
    /// §5.3.10 lines 8155-8220, hence the default when read).
    #[serde(default)]
    pub btrfs_list: Vec<BtrfsFileSystem>,
}

/// Body of `PUT /v3/sources/{id}/changestate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeState {
    /// Copy state.
    pub copystate: CopyState,
    /// Migration cycle.
    pub migrationcycle: MigrationCycle,
}

/// `copystate` values (docs/sms-api.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum CopyState {
    Unavailable,
    Waiting,
    Init,
    Replicate,
    Syncing,
    Stopping,
    Stopped,
    Skipping,
    Deleting,
    Error,
    Cloning,
    Cutovering,
    Finished,
    Clearing,
    Cleared,
    Clearfailed,
}

/// `migrationcycle` values (docs/sms-api.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum MigrationCycle {
    Checking,
    Setting,
    Replicating,
    Syncing,
    Cutovering,
    Cutovered,
}

impl ChangeState {
    /// Whether the service accepts this pair (the SMS.7728 table of docs/sms-api.md §5); the agent
    /// never sends a pair the service would refuse.
    pub fn is_valid(&self) -> bool {
        use CopyState as S;
        use MigrationCycle as C;
        let common = matches!(
            self.copystate,
            S::Deleting | S::Stopping | S::Error | S::Stopped
        );
        match self.migrationcycle {
            C::Checking => matches!(self.copystate, S::Unavailable | S::Waiting),
            C::Setting => matches!(self.copystate, S::Waiting),
            C::Replicating => common || matches!(self.copystate, S::Init | S::Replicate),
            C::Syncing => common || matches!(self.copystate, S::Syncing | S::Cloning),
            C::Cutovering => common || matches!(self.copystate, S::Cutovering),
            C::Cutovered => common || matches!(self.copystate, S::Finished),
        }
    }
}

/// Response of `GET /v3/sources/{id}/command`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// START, STOP, DELETE, SYNC, SKIP, UPLOAD_LOG, … or empty for nothing to do. An open string:
    /// unknown names are logged and ignored.
    #[serde(default, deserialize_with = "null_string")]
    pub command_name: String,
    /// Parameters.
    #[serde(default)]
    pub command_param: Option<CommandParam>,
}

/// `command_param`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandParam {
    /// Task the command is for.
    #[serde(default, deserialize_with = "null_string")]
    pub task_id: String,
    /// OBS bucket for UPLOAD_LOG.
    #[serde(default, deserialize_with = "null_string")]
    pub bucket: String,
}

/// Body of `POST /v3/sources/{id}/command_result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command answered.
    pub command_name: String,
    /// `success` or `fail`.
    pub result: String,
    /// Details; on failure `{"error_code": <SMS code>, "error_msg": …}`.
    pub result_detail: serde_json::Value,
}

/// The parts of `GET /v3/tasks/{id}` the agent uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    #[serde(default, deserialize_with = "null_string")]
    pub id: String,
    /// Task name.
    #[serde(default, deserialize_with = "null_string")]
    pub name: String,
    /// `MIGRATE_FILE` or `MIGRATE_BLOCK`.
    #[serde(default, rename = "type", deserialize_with = "null_string")]
    pub kind: String,
    /// Target address for data (`null` in the reference's example, line 11479).
    #[serde(default, deserialize_with = "null_string")]
    pub migration_ip: String,
    /// Task state.
    #[serde(default, deserialize_with = "null_string")]
    pub state: String,
    /// Speed limit in Mbit/s (0 = none): ref. §5.4.5 line 11253 ("迁移限速", 0..=65535), unit
    /// from §5.4.6 line 11823 ("单位: Mbps"). The lowest of it and the time-window rules
    /// applies.
    #[serde(default)]
    pub speed_limit: Option<u64>,
    /// Whether the task keeps syncing after its first copy (continuous sync): ref. §5.4.5
    /// line 10295 "是否同步", §5.4.1 line 9686 "复制或者同步后是否会继续持续同步".
    #[serde(default)]
    pub syncing: Option<bool>,
    /// Process priority, 0 low, 1 standard (default), 2 high: ref. §5.4.5 line 11252.
    /// §5.4.1 line 9682 allows 0..=65535 for the create body; the agent treats anything but
    /// 0 and 2 as standard.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Whether a consistency check is wanted: ref. §5.4.1 line 9691, §5.4.7 line 12927
    /// (default false).
    #[serde(default)]
    pub is_need_consistency_check: Option<bool>,
    /// Whether the network is checked before the first copy: ref. §5.4.1 line 9688
    /// ("是否开启网络检测"). §5.4.5's answer does not list it; the agent reads it when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_network_check: Option<bool>,
    /// Target server.
    #[serde(default)]
    pub target_server: Option<TargetServer>,
}

/// `target_server` of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetServer {
    /// The disks of the task: each source disk (`name`) and the target ECS disk it is copied
    /// to (`relation_name`); reference §5.4.5, line 11345 and the example at line 1235.
    #[serde(default, deserialize_with = "null_vec")]
    pub disks: Vec<TargetDisk>,
    /// LVM volume groups, whose LVs carry mount points too (file mode).
    #[serde(default, deserialize_with = "null_vec")]
    pub volume_groups: Vec<VolumeGroup>,
}

/// A volume group of `target_server`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeGroup {
    /// VG name.
    #[serde(default, deserialize_with = "null_string")]
    pub name: String,
    /// Its logical volumes.
    #[serde(default, deserialize_with = "null_vec")]
    pub logical_volumes: Vec<Volume>,
}

/// A partition (`physical_volumes[]`) or LV (`logical_volumes[]`) of the task's layout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// Device name on the source, e.g. `/dev/sda1` (reference example, line 1251).
    #[serde(default, deserialize_with = "null_string")]
    pub name: String,
    /// Partitions: the device on the target ECS, e.g. `/dev/vda1` (reference §5.4.5, line 11361;
    /// example line 1252). Not used by the agent: file tasks address mount points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation_name: Option<String>,
    /// Where the source has it mounted (empty when not mounted).
    #[serde(default, deserialize_with = "null_string")]
    pub mount_point: String,
    /// Filesystem type.
    #[serde(default, deserialize_with = "null_string")]
    pub file_system: String,
}

/// Body of `GET /v3/tasks/{id}/configuration-setting`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSettings {
    /// The settings, in the order the service gives them.
    #[serde(default)]
    pub configurations: Vec<ConfigBody>,
}

/// One task setting; the value is free text the agent parses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigBody {
    /// e.g. `MIGRATE_EXCLUDE_DIR`.
    #[serde(default)]
    pub config_key: String,
    /// The value (the reference's examples send strings and numbers).
    #[serde(default)]
    pub config_value: serde_json::Value,
}

/// A disk of `target_server.disks[]` (reference §5.4.5, table 5-148 `TargetDisk`, lines 11330-11345).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetDisk {
    /// The *source* disk, e.g. `/dev/sda` (reference example, line 1238).
    #[serde(default, deserialize_with = "null_string")]
    pub name: String,
    /// The disk of the target ECS it is copied to, e.g. `/dev/vda` ("Linux系统 目的端ECS中与源端
    /// 关联的磁盘名称", line 11345; example line 1239). `null` until the service assigns one.
    #[serde(default)]
    pub relation_name: Option<String>,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Its partitions, with their mount points (file mode).
    #[serde(default, deserialize_with = "null_vec")]
    pub physical_volumes: Vec<Volume>,
}

/// Body of `PUT /v3/tasks/{id}/progress` (docs/sms-api.md §6).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `MIGRATE_LINUX_BLOCK`, `MIGRATE_LINUX_FILE`, `SYNC_LINUX_BLOCK`, `SYNC_LINUX_FILE`.
    pub subtask_name: String,
    /// 0–100 for the subtask.
    pub progress: u32,
    /// Bytes done.
    pub replicatesize: u64,
    /// Bytes in all.
    pub totalsize: u64,
    /// Detail, at most 2048 characters.
    pub process_trace: String,
    /// Mbit/s over the last 5 s, before compression.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrate_speed: Option<f64>,
    /// Compression ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress_rate: Option<f64>,
    /// Seconds left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remain_time: Option<u64>,
    /// Host CPU %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_cpu_usage: Option<f64>,
    /// Agent CPU %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cpu_usage: Option<f64>,
    /// Host memory MB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_mem_usage: Option<f64>,
    /// Agent memory MB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_mem_usage: Option<f64>,
    /// Host disk MB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_disk_io: Option<f64>,
    /// Agent disk MB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_disk_io: Option<f64>,
    /// Agent's local time (`YYYY-MM-DD HH:MM:SS`), for time-windowed speed limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_time: Option<String>,
}

/// Response of `GET /v3/tasks/{id}/speed-limit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeedLimits {
    /// Rules.
    #[serde(default)]
    pub speed_limit: Vec<SpeedLimitRule>,
}

/// One speed-limit window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeedLimitRule {
    /// `H:MM` start of the window, agent local time.
    #[serde(default)]
    pub start: String,
    /// `H:MM` end.
    #[serde(default)]
    pub end: String,
    /// Mbit/s, 0 = unlimited.
    #[serde(default)]
    pub speed: u64,
    /// Percent over the limit at which the service stops the task.
    #[serde(default)]
    pub over_speed_threshold: Option<f64>,
}

/// Response of `GET /v3/tasks/{id}/certkey`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CertKey {
    #[serde(default)]
    pub cert: String,
    #[serde(default)]
    pub private_key: String,
    #[serde(default)]
    pub ca: String,
    #[serde(default)]
    pub target_mgmt_cert: String,
    #[serde(default)]
    pub target_mgmt_private_key: String,
    #[serde(default)]
    pub target_data_cert: String,
    #[serde(default)]
    pub target_data_private_key: String,
}

/// Response of `GET /v3/tasks/{id}/passphrase`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Passphrase {
    /// Task id.
    #[serde(default)]
    pub task_id: String,
    /// Passphrase of the encrypted private key.
    #[serde(default)]
    pub passphrase: String,
}

/// Response of `GET /v3/config` (ref. §5.2.1, lines 2135–2231: "the source agent calls it
/// after it starts"). `config` is documented as `Map<String, String>` holding "mainRegion,
/// obs_domain, disktype, process_and_it and whatever is added later" (line 2163); it is read
/// as any JSON so a newer key with a non-string value cannot break start-up, and both parts
/// may be missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// `mainRegion`, `obs_domain`, `disktype`, `process_and_it`, … (strings per the table).
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, serde_json::Value>,
    /// Regions, e.g. `{"region_name": "cn-north-4", "project_name": "cn-north-4"}`
    /// (example, line 2211).
    #[serde(default)]
    pub regions: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl AgentConfig {
    /// The string value of `key`, when present, a non-empty string (numbers and booleans are
    /// taken as their text: the reference types the map's values as strings, line 2163).
    pub fn get_str(&self, key: &str) -> Option<String> {
        match self.config.get(key)? {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
            _ => None,
        }
    }

    /// What the agent keeps of it (see [`ServiceConfig`]).
    pub fn kept(&self) -> ServiceConfig {
        ServiceConfig {
            main_region: self.get_str("mainRegion"),
            obs_domain: self.get_str("obs_domain"),
        }
    }
}

/// What the daemon keeps of `GET /v3/config`: the keys it uses. The reference documents no
/// limits in this call (only `mainRegion`, `obs_domain`, `disktype`, `process_and_it`, line
/// 2163), so none are kept; `disktype` and `process_and_it` concern the target and the
/// service, not a Linux source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// `mainRegion`: the service's main region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_region: Option<String>,
    /// `obs_domain`: the OBS endpoint domain a later log upload (UPLOAD_LOG) goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obs_domain: Option<String>,
}

/// Body of `POST /v3/tasks/{id}/consistency-result` (at most 30 entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyResults {
    /// One entry per checked directory.
    pub consistency_result: Vec<ConsistencyResult>,
}

/// The consistency check of one directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyResult {
    /// Directory checked.
    pub dir_check: String,
    /// Files in it.
    pub num_total_files: u64,
    /// Files that differ on the target.
    pub num_different_files: u64,
    /// Files missing on the target.
    pub num_target_miss_files: u64,
    /// Files only on the target.
    pub num_target_more_files: u64,
}

/// Body of `POST /v3/{task_id}/update-network-check-info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkCheckInfo {
    /// The API domain is reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain_connectivity: Option<bool>,
    /// The target is reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_connectivity: Option<bool>,
    /// Latency, ms.
    pub network_delay: f64,
    /// Jitter, ms.
    pub network_jitter: f64,
    /// Bandwidth, Mbit/s.
    pub migration_speed: f64,
    /// Packet loss, %.
    pub loss_percentage: f64,
    /// CPU use, %.
    pub cpu_usage: f64,
    /// Memory use, %.
    pub mem_usage: f64,
    /// Verdict (6–8 characters, e.g. `GOOD`-style words the service defines).
    pub evaluation_result: String,
}

/// Task settings (`GET/POST /v3/tasks/{id}/configuration-setting`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigurationSettings {
    /// Settings.
    #[serde(default)]
    pub configurations: Vec<ConfigurationSetting>,
}

/// One task setting, e.g. `MIGRATE_EXCLUDE_DIR`, `LINUX_CPU_LIMIT`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigurationSetting {
    /// Setting name.
    pub config_key: String,
    /// Value; the reference sends numbers and strings.
    #[serde(default)]
    pub config_value: serde_json::Value,
    /// Status, when the service reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_status: Option<String>,
}

/// An SMS error body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `SMS.xxxx` (or `APIGW.xxxx` from the gateway).
    #[serde(default)]
    pub error_code: String,
    /// Message.
    #[serde(default)]
    pub error_msg: String,
}

fn null_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A list the service may send as `null` (the reference's task examples show `null` for
/// absent values, e.g. lines 11470-11479).
fn null_vec<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copystate_pairs() {
        use CopyState as S;
        use MigrationCycle as C;
        let ok = |s, c| {
            ChangeState {
                copystate: s,
                migrationcycle: c,
            }
            .is_valid()
        };
        assert!(ok(S::Waiting, C::Checking));
        assert!(ok(S::Init, C::Replicating));
        assert!(ok(S::Replicate, C::Replicating));
        assert!(ok(S::Syncing, C::Syncing));
        assert!(ok(S::Stopped, C::Replicating));
        assert!(!ok(S::Replicate, C::Checking));
        assert!(!ok(S::Syncing, C::Replicating));
        assert!(!ok(S::Init, C::Syncing));
        assert!(!ok(S::Finished, C::Syncing));
        let j = serde_json::to_string(&ChangeState {
            copystate: S::Waiting,
            migrationcycle: C::Checking,
        })
        .unwrap();
        assert_eq!(j, r#"{"copystate":"WAITING","migrationcycle":"checking"}"#);
    }

    #[test]
    fn reference_examples_round_trip() {
        // Request examples of reference §5.4.8, §5.4.14 and §5.10.1, verbatim.
        let progress = r#"{"subtask_name": "ATTACH_AGENT_IMAGE", "progress": 100, "replicatesize": 1000, "totalsize": 100000, "process_trace": ""}"#;
        let p: Progress = serde_json::from_str(progress).unwrap();
        assert_eq!((p.progress, p.totalsize), (100, 100_000));
        let v: serde_json::Value = serde_json::from_str(progress).unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap(), v);

        let cr = r#"{"consistency_result": [{"dir_check": "/root/data", "num_total_files": 1235, "num_different_files": 12, "num_target_miss_files": 12, "num_target_more_files": 12}, {"dir_check": "/var", "num_total_files": 1235, "num_different_files": 12, "num_target_miss_files": 12, "num_target_more_files": 12}]}"#;
        let c: ConsistencyResults = serde_json::from_str(cr).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::from_str::<serde_json::Value>(cr).unwrap()
        );

        let cs = r#"{"configurations": [{"config_key": "LINUX_CPU_LIMIT", "config_value": 50}]}"#;
        let c: ConfigurationSettings = serde_json::from_str(cs).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::from_str::<serde_json::Value>(cs).unwrap()
        );

        let cfg: AgentConfig = serde_json::from_str(
            r#"{"config": {"mainRegion": "cn-north-4"}, "regions": [{"id": "cn-north-4"}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.config["mainRegion"], "cn-north-4");
    }

    #[test]
    fn agent_config_tolerates_missing_unknown_and_odd_keys() {
        // The reference's example (§5.2.1, line 2206): no obs_domain.
        let ex: AgentConfig = serde_json::from_str(
            r#"{"config": {"mainRegion": "ap-southeast-1", "disktype": "SATA"},
                "regions": [{"region_name": "cn-north-1", "project_name": "cn-north-1"},
                            {"region_name": "cn-north-4", "project_name": "cn-north-4"}]}"#,
        )
        .unwrap();
        assert_eq!(
            ex.kept(),
            ServiceConfig {
                main_region: Some("ap-southeast-1".into()),
                obs_domain: None
            }
        );
        assert_eq!(ex.regions.len(), 2);
        let odd: AgentConfig = serde_json::from_str(
            r#"{"config": {"obs_domain": " obs.cn-north-4.myhuaweicloud.com ", "limit": 5,
                           "nested": {"a": 1}, "mainRegion": ""}, "extra": true}"#,
        )
        .unwrap();
        assert_eq!(
            odd.kept().obs_domain.as_deref(),
            Some("obs.cn-north-4.myhuaweicloud.com")
        );
        assert_eq!(odd.kept().main_region, None);
        assert_eq!(odd.get_str("limit").as_deref(), Some("5"));
        assert_eq!(odd.get_str("nested"), None);
        let empty: AgentConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.kept(), ServiceConfig::default());
    }

    #[test]
    fn reference_command_examples() {
        let c: Command = serde_json::from_str(r#"{"command_name": "START", "command_param": {"task_id": "xxxxxxxxxxxxxxxxxxxxxx00000001"}}"#).unwrap();
        assert_eq!(c.command_name, "START");
        assert_eq!(
            c.command_param.unwrap().task_id,
            "xxxxxxxxxxxxxxxxxxxxxx00000001"
        );
        let c: Command =
            serde_json::from_str(r#"{"command_name": null, "command_param": null, "extra": 1}"#)
                .unwrap();
        assert!(c.command_name.is_empty());
        let c: Command = serde_json::from_str("{}").unwrap();
        assert!(c.command_name.is_empty());
        assert!(serde_json::from_str::<Command>(r#"{"command_name": 5}"#).is_err());
    }
}
