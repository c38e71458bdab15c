//! LVM volume groups and logical volumes, from `lvm fullreport` run read-only.
//!
//! `--readonly` reads the on-disk metadata without taking locks or activating anything, so this
//! works on hosts where the LVs are inactive or device-mapper is missing.

use serde::Deserialize;

use crate::tools::{self, ToolError};

/// A volume group as LVM reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vg {
    /// VG name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Free bytes.
    pub free: u64,
    /// Physical volumes.
    pub pvs: Vec<Pv>,
    /// Logical volumes (hidden internal LVs excluded).
    pub lvs: Vec<Lv>,
}

/// A physical volume of a VG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pv {
    /// Device path as LVM found it (`[unknown]` when missing).
    pub name: String,
    /// Device number, when the device is present.
    pub dev: Option<(u32, u32)>,
}

/// A logical volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    /// LV name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Kernel device number when the LV is active.
    pub dev: Option<(u32, u32)>,
}

/// Why the LVM report could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    /// The `lvm` command failed or is missing.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The report was not the JSON we expect.
    #[error("cannot parse `lvm fullreport` output: {0}")]
    Parse(String),
}

/// Runs `lvm fullreport` read-only and returns every VG it sees.
pub fn volume_groups() -> Result<Vec<Vg>, LvmError> {
    let out = tools::run(
        "lvm",
        &[
            "fullreport",
            "--readonly",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "--configreport",
            "vg",
            "-o",
            "vg_name,vg_size,vg_free",
            "--configreport",
            "pv",
            "-o",
            "pv_name,pv_major,pv_minor",
            "--configreport",
            "lv",
            "-o",
            "lv_name,lv_size,lv_kernel_major,lv_kernel_minor",
            "--configreport",
            "pvseg",
            "-o",
            "pvseg_start",
            "--configreport",
            "seg",
            "-o",
            "segtype",
        ],
    )?;
    parse_fullreport(&out)
}

#[derive(Deserialize)]
struct Report {
    report: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    vg: Vec<RawVg>,
    #[serde(default)]
    pv: Vec<RawPv>,
    #[serde(default)]
    lv: Vec<RawLv>,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_size: String,
    vg_free: String,
}

#[derive(Deserialize)]
struct RawPv {
    pv_name: String,
    #[serde(default)]
    pv_major: String,
    #[serde(default)]
    pv_minor: String,
}

#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    lv_size: String,
    #[serde(default)]
    lv_kernel_major: String,
    #[serde(default)]
    lv_kernel_minor: String,
}

fn num(field: &str, v: &str) -> Result<u64, LvmError> {
    v.trim()
        .parse()
        .map_err(|_| LvmError::Parse(format!("{field} is {v:?}, not a byte count")))
}

fn devnum(major: &str, minor: &str) -> Option<(u32, u32)> {
    Some((major.trim().parse().ok()?, minor.trim().parse().ok()?))
}

/// Parses the JSON of `lvm fullreport`; orphan PVs (no VG) are skipped.
pub fn parse_fullreport(json: &str) -> Result<Vec<Vg>, LvmError> {
    let report: Report = serde_json::from_str(json).map_err(|e| LvmError::Parse(e.to_string()))?;
    let mut vgs = Vec::new();
    for e in report.report {
        // A fullreport entry without a VG lists orphan PVs.
        let Some(vg) = e.vg.into_iter().next() else {
            continue;
        };
        let pvs = e
            .pv
            .into_iter()
            .map(|p| Pv {
                dev: devnum(&p.pv_major, &p.pv_minor),
                name: p.pv_name,
            })
            .collect();
        let mut lvs = Vec::new();
        for l in e.lv {
            // Internal LVs (thin pool data/metadata, mirror legs) are bracketed and not usable.
            if l.lv_name.starts_with('[') {
                continue;
            }
            lvs.push(Lv {
                size: num("lv_size", &l.lv_size)?,
                dev: devnum(&l.lv_kernel_major, &l.lv_kernel_minor),
                name: l.lv_name,
            });
        }
        vgs.push(Vg {
            size: num("vg_size", &vg.vg_size)?,
            free: num("vg_free", &vg.vg_free)?,
            name: vg.vg_name,
            pvs,
            lvs,
        });
    }
    Ok(vgs)
}

/// The device-mapper name of an LV, `/dev/mapper/VG-LV`, with each `-` inside a name doubled
/// (as `dm_build_dm_name` does) so the separator stays unambiguous.
pub fn mapper_path(vg: &str, lv: &str) -> String {
    format!(
        "/dev/mapper/{}-{}",
        vg.replace('-', "--"),
        lv.replace('-', "--")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"  {
      "report": [
          {
              "vg": [ {"vg_name":"vgt-x", "vg_size":"205520896", "vg_free":"163577856"} ],
              "pv": [ {"pv_name":"/dev/loop0", "pv_major":"7", "pv_minor":"0"},
                      {"pv_name":"[unknown]", "pv_major":"-1", "pv_minor":"-1"} ],
              "lv": [ {"lv_name":"lv-a", "lv_size":"41943040", "lv_kernel_major":"-1", "lv_kernel_minor":"-1"},
                      {"lv_name":"root", "lv_size":"4194304", "lv_kernel_major":"253", "lv_kernel_minor":"0"},
                      {"lv_name":"[pool_tmeta]", "lv_size":"4194304"} ],
              "pvseg": [ {"pvseg_start":"0"} ],
              "seg": [ {"segtype":"linear"} ]
          },
          { "vg": [], "pv": [ {"pv_name":"/dev/loop9", "pv_major":"7", "pv_minor":"9"} ], "lv": [] }
      ]
  }"#;

    #[test]
    fn parses_fullreport() {
        let vgs = parse_fullreport(SAMPLE).unwrap();
        assert_eq!(vgs.len(), 1);
        let vg = &vgs[0];
        assert_eq!((vg.name.as_str(), vg.size, vg.free), ("vgt-x", 205_520_896, 163_577_856));
        assert_eq!(vg.pvs[0].dev, Some((7, 0)));
        assert_eq!(vg.pvs[1].dev, None);
        assert_eq!(vg.lvs.len(), 2);
        assert_eq!(vg.lvs[0].dev, None);
        assert_eq!(vg.lvs[1].dev, Some((253, 0)));
    }

    #[test]
    fn bad_reports_are_errors() {
        assert!(matches!(parse_fullreport("not json"), Err(LvmError::Parse(_))));
        let bad = r#"{"report":[{"vg":[{"vg_name":"a","vg_size":"12G","vg_free":"0"}]}]}"#;
        let err = parse_fullreport(bad).unwrap_err().to_string();
        assert!(err.contains("vg_size") && err.contains("12G"), "{err}");
    }

    #[test]
    fn mapper_names_double_dashes() {
        assert_eq!(mapper_path("vg0", "root"), "/dev/mapper/vg0-root");
        assert_eq!(mapper_path("vgt-x", "lv-a"), "/dev/mapper/vgt--x-lv--a");
    }
}
