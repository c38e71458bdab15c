//! The SMS error codes the agent reports or receives, and the failure of a task pass that
//! carries one; codes travel as strings (`SMS.1908`) on the wire and in the API.
//!
//! Each variant's doc comment is the meaning the SMS API reference gives the code (its English
//! text, `%s` being the cause the message fills in), and every variant is a code of the
//! reference's §6.1 table (`sms-api-reference.zh.txt` lines 24867–25480; the line of each is
//! given). No code is invented: a code the service sends that is not listed here is kept as
//! [`Code::Other`].

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// Declares [`Code`] from one table, so the variant, its string and its parse cannot drift.
macro_rules! codes {
    ($( $(#[doc = $doc:literal])* $name:ident = $text:literal, )*) => {
        /// An SMS error code.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum Code {
            $( $(#[doc = $doc])* $name, )*
            /// A code this build does not know, as a peer or the service sent it.
            Other(String),
        }

        impl Code {
            /// Every code this build knows, in numeric order.
            pub const KNOWN: &'static [Code] = &[$(Code::$name),*];

            /// The code as SMS writes it (`SMS.1908`).
            pub fn as_str(&self) -> &str {
                match self {
                    $( Code::$name => $text, )*
                    Code::Other(s) => s,
                }
            }

            /// Reads a code sent by a peer or the service; an unknown one is kept as
            /// [`Code::Other`], since a newer peer may send codes this build has never seen.
            pub fn parse(s: &str) -> Code {
                match s {
                    $( $text => Code::$name, )*
                    other => Code::Other(other.to_string()),
                }
            }
        }
    };
}

codes! {
    /// Network busy. Source server failed to connect to API Gateway. (§6.1, line 24874)
    ApiNetworkBusy = "SMS.0201",
    /// Connection from source server to API Gateway timed out. (line 24876)
    ApiTimeout = "SMS.0203",
    /// AK/SK authentication failed. The time or time zone of the source server is incorrect.
    /// (line 24880)
    ClockSkew = "SMS.0205",
    /// Network request TLS/SSL authentication failed. Cause: %s (line 24892)
    TlsAuthFailed = "SMS.0304",
    /// Failed to report the task progress to SMS. (line 24921)
    ProgressReportFailed = "SMS.0501",
    /// Source server registration failed. Cause: %s (line 24922)
    RegistrationFailed = "SMS.0502",
    /// Log upload failed. Cause: %s (line 24923). The agent's own log upload (UPLOAD_LOG);
    /// not SMS.0414, which is the service copying logs between OBS buckets (line 24904).
    LogUploadFailed = "SMS.0503",
    /// Failed to obtain the private key. Cause: %s (line 24933)
    PrivateKeyNotObtained = "SMS.0511",
    /// Migration failed. Source disk information has changed. Delete target server
    /// configuration and restart the Agent. (line 24937)
    SourceDisksChanged = "SMS.0515",
    /// Failed to obtain the certificate password. Cause: %s (line 24943)
    PassphraseNotObtained = "SMS.0521",
    /// Insufficient disks on the target server. (line 24993)
    TooFewTargetDisks = "SMS.1311",
    /// Partition failed. Disk: %s. Cause: %s (line 24994)
    PartitionFailed = "SMS.1312",
    /// Disk %s is abnormal. Expected status: %s (line 25001)
    DiskAbnormal = "SMS.1404",
    /// The sizes of disks on the target server do not match those on the source server.
    /// (line 25025)
    DiskSizeMismatch = "SMS.1504",
    /// No system partition found. (line 25028)
    NoSystemPartition = "SMS.1507",
    /// Mount point, partition, or disk configured in disk.cfg not found. (line 25029)
    MountPointNotFound = "SMS.1508",
    /// Configure advanced option %s failed. Cause: %s. (line 25031)
    AdvancedOptionFailed = "SMS.1510",
    /// failed to check the consistency, Cause: %s (line 25032)
    ConsistencyCheckFailed = "SMS.1511",
    /// Migration or synchronization task paused. (line 25038)
    TaskPaused = "SMS.1802",
    /// Failed to connect to the target server. Check whether its IP address %s is reachable
    /// and confirm that port 8900 is enabled. (line 25040)
    TargetUnreachable = "SMS.1807",
    /// Agent could not read disk information. (line 25041)
    DiskUnreadable = "SMS.1901",
    /// Failed to read the disk information. (line 25047)
    VolumeUnreadable = "SMS.1905",
    /// Data transmission failed. (line 25049)
    TransmissionFailed = "SMS.1908",
    /// Data compression failed. (line 25050)
    CompressionFailed = "SMS.1909",
    /// Failed to modify the configuration file of the target server. Cause: %s (line 25083)
    TargetConfigFailed = "SMS.3101",
    /// Failed to modify the initrd file on the target server. Cause: %s (line 25084)
    InitrdFailed = "SMS.3102",
    /// Failed to execute bootloader on the target server. Cause: %s (line 25087)
    BootloaderFailed = "SMS.3103",
    /// fstab record "%s" is invalid (line 24872)
    FstabInvalid = "SMS.3105",
    /// Failed to create swap partition %s. Cause: %s (line 25091)
    SwapFailed = "SMS.3204",
    /// Failed to mount partition %s to directory %s. Cause: %s (line 25092)
    MountFailed = "SMS.3205",
    /// Failed to obtain the UUID of the partition on the target server. Cause: %s (line 25093)
    PartitionUuidFailed = "SMS.3206",
    /// Failed to create file %s on the target server. Cause: %s (line 25094)
    TargetFileCreateFailed = "SMS.3207",
    /// Failed to write file %s on the target server. Cause: %s (line 25097)
    TargetFileWriteFailed = "SMS.3208",
    /// Failed to format partition %s to %s. Cause: %s (line 25099)
    FormatFailed = "SMS.3210",
    /// Failed to load the SSL certificate. (line 25101)
    SslCertNotLoaded = "SMS.3301",
    /// The JSON request body does not meet the specifications. (line 25157) The agent's
    /// answer to a command whose parameters it cannot act on (a task type it does not know).
    BodyNotToSpec = "SMS.6011",
    /// Incomplete request parameters. (line 25159) The agent's answer to a START or SYNC
    /// without `command_param.task_id`.
    IncompleteParameters = "SMS.6013",
    /// The command from the Agent is inconsistent with that from SMS. (line 25164) The
    /// agent's answer to a command it does not know. §6.1 has no code for "unknown command";
    /// this is the closest documented one (the agent's and the service's commands disagree).
    CommandMismatch = "SMS.6021",
    /// Invalid source server ID. (line 25169)
    InvalidSourceId = "SMS.6030",
    /// The disk space is less than the total size of all partitions. (line 25241)
    DiskTooSmallForPartitions = "SMS.6539",
    /// The current Agent version does not support log upload. (line 25298: the agent must be
    /// at least 25.2.0.) Sent by the service; see `agent::api::REPORTED_AGENT_VERSION`.
    AgentTooOldForLogs = "SMS.7707",
    /// Change server replication state or migration cycle failed. Values of copystate and
    /// migrationcycle do not match. (line 25321)
    CopyStateMismatch = "SMS.7728",
}

impl Code {
    /// Whether a pass that failed with this code may succeed when started again from its
    /// checkpoint: an unreachable target or a broken transfer are often passing trouble, and
    /// a resumed pass costs little; anything else (a refused plan, an unreadable disk, a full
    /// target) needs the operator. This is the one place that decides it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Code::TargetUnreachable | Code::TransmissionFailed)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Code {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Code::parse(s))
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Why a task pass (or a step of the task around it) failed: the code to report and the
/// operator-facing text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TaskFailure {
    /// The SMS code reported as `error_code`.
    pub code: Code,
    /// The text reported as `error_msg`.
    pub message: String,
}

impl TaskFailure {
    /// A failure with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Whether starting the pass again from its checkpoint may succeed (see
    /// [`Code::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_and_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::KNOWN {
            assert!(seen.insert(c.as_str()), "{c} twice");
            assert!(
                c.as_str().starts_with("SMS.") && c.as_str().len() == 8,
                "{c}"
            );
            assert_eq!(&Code::parse(c.as_str()), c);
            assert_eq!(c.to_string().parse::<Code>(), Ok(c.clone()));
        }
    }

    #[test]
    fn known_codes_are_in_numeric_order_and_none_is_invented_or_misused() {
        let texts: Vec<&str> = Code::KNOWN.iter().map(Code::as_str).collect();
        let mut sorted = texts.clone();
        sorted.sort_unstable();
        assert_eq!(texts, sorted);
        // SMS.9999 is not in §6.1; SMS.9004 is "permission denied" (line 25345) and SMS.0414
        // the service's own log copy (line 24904): neither is the agent's to report.
        for c in ["SMS.9999", "SMS.9004", "SMS.0414"] {
            assert_eq!(Code::parse(c), Code::Other(c.into()));
        }
    }

    #[test]
    fn unknown_codes_are_kept_and_not_retried() {
        let c = Code::parse("SMS.4242");
        assert_eq!(c, Code::Other("SMS.4242".into()));
        assert_eq!(c, "SMS.4242");
        assert!(!c.is_retryable());
    }

    #[test]
    fn only_transport_trouble_is_retried() {
        let retried: Vec<_> = Code::KNOWN.iter().filter(|c| c.is_retryable()).collect();
        assert_eq!(
            retried,
            [&Code::TargetUnreachable, &Code::TransmissionFailed]
        );
        let f = TaskFailure::new(Code::TransmissionFailed, "lost");
        assert!(f.is_retryable());
        assert_eq!(f.to_string(), "SMS.1908: lost");
    }
}
