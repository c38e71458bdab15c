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

/// Runs `lvm fullreport` read-only and returns every VG it sees; LVM older than 2.02.158
/// (CentOS 6, SLES 11) has neither `fullreport` nor JSON, so it falls back to `vgs`/`pvs`/`lvs`.
pub fn volume_groups() -> Result<Vec<Vg>, LvmError> {
    match fullreport() {
        Ok(v) => Ok(v),
        Err(first) => legacy().map_err(|_| first),
    }
}

fn fullreport() -> Result<Vec<Vg>, LvmError> {
    let out = tools::run(
        "lvm",
        &[
            "fullreport",
            "--readonly",
            // Scanning may otherwise rewrite /run/lvm/hints; the probe writes nothing.
            "--config",
            "devices { hints = \"none\" }",
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

/// Separator for the legacy column reports: never part of a device, VG or LV name.
const SEP: &str = "|";

fn legacy_report(cmd: &str, fields: &str) -> Result<Vec<Vec<String>>, LvmError> {
    let out = tools::run(
        "lvm",
        &[
            cmd,
            "--readonly",
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "--separator",
            SEP,
            "-o",
            fields,
        ],
    )?;
    Ok(parse_columns(&out))
}

fn parse_columns(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(SEP).map(|c| c.trim().to_string()).collect())
        .collect()
}

fn legacy() -> Result<Vec<Vg>, LvmError> {
    let vgs = legacy_report("vgs", "vg_name,vg_size,vg_free")?;
    let pvs = legacy_report("pvs", "pv_name,vg_name")?;
    let lvs = legacy_report(
        "lvs",
        "vg_name,lv_name,lv_size,lv_kernel_major,lv_kernel_minor",
    )?;
    assemble_legacy(&vgs, &pvs, &lvs, |p| {
        use std::os::unix::fs::MetadataExt;
        crate::blockdev::split_rdev(std::fs::metadata(p).ok()?.rdev())
    })
}

fn assemble_legacy(
    vgs: &[Vec<String>],
    pvs: &[Vec<String>],
    lvs: &[Vec<String>],
    devnum_of: impl Fn(&str) -> Option<(u32, u32)>,
) -> Result<Vec<Vg>, LvmError> {
    let mut out = Vec::new();
    for row in vgs {
        let [name, size, free] = row.as_slice() else {
            return Err(LvmError::Parse(format!("unexpected vgs row {row:?}")));
        };
        let mut vg = Vg {
            name: name.clone(),
            size: num("vg_size", size)?,
            free: num("vg_free", free)?,
            pvs: Vec::new(),
            lvs: Vec::new(),
        };
        for p in pvs {
            if let [pv, owner] = p.as_slice() {
                if owner == name {
                    vg.pvs.push(Pv {
                        dev: devnum_of(pv),
                        name: pv.clone(),
                    });
                }
            }
        }
        for l in lvs {
            if let [owner, lv, size, major, minor] = l.as_slice() {
                if owner == name && !lv.starts_with('[') {
                    vg.lvs.push(Lv {
                        name: lv.clone(),
                        size: num("lv_size", size)?,
                        dev: devnum(major, minor),
                    });
                }
            }
        }
        out.push(vg);
    }
    Ok(out)
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
        let pvs =
            e.pv.into_iter()
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
        assert_eq!(
            (vg.name.as_str(), vg.size, vg.free),
            ("vgt-x", 205_520_896, 163_577_856)
        );
        assert_eq!(vg.pvs[0].dev, Some((7, 0)));
        assert_eq!(vg.pvs[1].dev, None);
        assert_eq!(vg.lvs.len(), 2);
        assert_eq!(vg.lvs[0].dev, None);
        assert_eq!(vg.lvs[1].dev, Some((253, 0)));
    }

    #[test]
    fn bad_reports_are_errors() {
        assert!(matches!(
            parse_fullreport("not json"),
            Err(LvmError::Parse(_))
        ));
        let bad = r#"{"report":[{"vg":[{"vg_name":"a","vg_size":"12G","vg_free":"0"}]}]}"#;
        let err = parse_fullreport(bad).unwrap_err().to_string();
        assert!(err.contains("vg_size") && err.contains("12G"), "{err}");
    }

    #[test]
    fn parses_legacy_columns() {
        let vgs = parse_columns("  vg0|21470642176|4194304\n\n");
        let pvs = parse_columns("  /dev/vdb1|vg0\n  /dev/vdc|vg0\n  /dev/vdd|\n");
        let lvs = parse_columns("  vg0|root|17175674880|253|0\n  vg0|swap-1|4290772992|-1|-1\n");
        let out =
            assemble_legacy(&vgs, &pvs, &lvs, |p| (p == "/dev/vdc").then_some((252, 32))).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].size, 21_470_642_176);
        assert_eq!(out[0].pvs.len(), 2);
        assert_eq!(out[0].pvs[1].dev, Some((252, 32)));
        assert_eq!(out[0].lvs[0].dev, Some((253, 0)));
        assert_eq!(out[0].lvs[1].dev, None);
        let bad = parse_columns("vg0|x\n");
        assert!(assemble_legacy(&bad, &[], &[], |_| None).is_err());
    }

    #[test]
    fn mapper_names_double_dashes() {
        assert_eq!(mapper_path("vg0", "root"), "/dev/mapper/vg0-root");
        assert_eq!(mapper_path("vgt-x", "lv-a"), "/dev/mapper/vgt--x-lv--a");
    }
}
