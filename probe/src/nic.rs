//! Network interfaces: real NICs with their addresses, netmask, gateway, MTU and hashed MAC.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::model::NetWork;
use crate::warn::Warnings;

/// Interface name prefixes that are never real NICs (loopback, containers, virtual bridges,
/// traffic shaping). tun/tap are detected by `tun_flags`, not by name.
const SKIP_PREFIXES: &[&str] = &[
    "lo",
    "docker",
    "veth",
    "virbr",
    "br-",
    "ifb",
    "cali",
    "flannel",
    "cni",
    "kube-ipvs",
];

/// `RTF_GATEWAY` of a `/proc/net/route` line (include/uapi/linux/route.h).
const RTF_GATEWAY: u32 = 0x2;

/// The networks part of the registration body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetInfo {
    /// Real NICs.
    pub networks: Vec<NetWork>,
    /// IPv4 of the default-route NIC (else the first NIC's, else empty).
    pub default_ip: String,
}

/// An address as getifaddrs reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface.
    pub name: String,
    /// Address.
    pub addr: IpAddr,
    /// Netmask.
    pub netmask: Option<IpAddr>,
}

/// Lists the real NICs; `extra` names interfaces to include although they would be skipped.
pub fn networks(root: &Path, extra: &[String], w: &mut Warnings) -> NetInfo {
    let net = root.join("sys/class/net");
    let names: Vec<String> = match fs::read_dir(&net) {
        Ok(e) => e
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            w.push(
                net.display().to_string(),
                format!("cannot list interfaces: {e}"),
            );
            Vec::new()
        }
    };
    let mut kept: Vec<(String, u32, String)> = Vec::new();
    for name in names {
        let dir = net.join(&name);
        let wanted = extra.contains(&name);
        let tun = dir.join("tun_flags").exists();
        if !wanted && (tun || SKIP_PREFIXES.iter().any(|p| name.starts_with(p))) {
            continue;
        }
        let mtu = fs::read_to_string(dir.join("mtu"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mac = fs::read_to_string(dir.join("address"))
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_default();
        kept.push((name, mtu, mac));
    }
    kept.sort();
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(list) => list
            .filter_map(|a| {
                let addr = a.address.as_ref().and_then(to_ip)?;
                Some(IfAddr {
                    name: a.interface_name.clone(),
                    addr,
                    netmask: a.netmask.as_ref().and_then(to_ip),
                })
            })
            .collect(),
        Err(e) => {
            w.push("getifaddrs", format!("cannot list addresses: {e}"));
            Vec::new()
        }
    };
    let routes = fs::read_to_string(root.join("proc/net/route")).unwrap_or_default();
    assemble(&kept, &addrs, &routes)
}

fn to_ip(s: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Lowercase hex SHA-256 of the lowercase colon-separated MAC, as SMS expects `mac`.
pub fn mac_hash(mac: &str) -> String {
    Sha256::digest(mac.to_ascii_lowercase().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Default routes of `/proc/net/route`: (interface, gateway, metric).
pub fn default_routes(text: &str) -> Vec<(String, Ipv4Addr, u32)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (iface, dest, gw, flags, metric, mask) = (
                f.first()?,
                f.get(1)?,
                f.get(2)?,
                f.get(3)?,
                f.get(6)?,
                f.get(7)?,
            );
            if *dest != "00000000" || *mask != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(flags, 16).ok()?;
            // The kernel prints the address in host (little-endian) order.
            let gw = u32::from_str_radix(gw, 16).ok()?;
            let gw = Ipv4Addr::from(gw.swap_bytes());
            let gw = if flags & RTF_GATEWAY != 0 {
                gw
            } else {
                Ipv4Addr::UNSPECIFIED
            };
            Some((iface.to_string(), gw, metric.parse().ok()?))
        })
        .collect()
}

/// Builds the NIC list from the interfaces kept, their addresses and the route table.
pub fn assemble(ifaces: &[(String, u32, String)], addrs: &[IfAddr], routes: &str) -> NetInfo {
    let defaults = default_routes(routes);
    let mut networks = Vec::new();
    for (name, mtu, mac) in ifaces {
        let v4 = addrs.iter().find(|a| &a.name == name && a.addr.is_ipv4());
        let v6 = addrs
            .iter()
            .filter(|a| &a.name == name)
            .filter_map(|a| match a.addr {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
            .min_by_key(link_local);
        let gateway = defaults
            .iter()
            .filter(|(i, gw, _)| i == name && !gw.is_unspecified())
            .min_by_key(|(_, _, m)| *m)
            .map(|(_, gw, _)| gw.to_string())
            .unwrap_or_default();
        networks.push(NetWork {
            name: name.clone(),
            ip: v4.map(|a| a.addr.to_string()).unwrap_or_default(),
            ipv6: v6.map(|a| a.to_string()),
            netmask: v4
                .and_then(|a| a.netmask)
                .map(|m| m.to_string())
                .unwrap_or_default(),
            gateway,
            mtu: *mtu,
            mac: if mac.is_empty() {
                String::new()
            } else {
                mac_hash(mac)
            },
            id: None,
        });
    }
    let default_if = defaults
        .iter()
        .min_by_key(|(_, _, m)| *m)
        .map(|(i, _, _)| i.clone());
    let default_ip = default_if
        .and_then(|i| networks.iter().find(|n| n.name == i && !n.ip.is_empty()))
        .or_else(|| networks.iter().find(|n| !n.ip.is_empty()))
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    NetInfo {
        networks,
        default_ip,
    }
}

fn link_local(v6: &Ipv6Addr) -> bool {
    v6.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn mac_hash_is_sha256_of_lowercase_text() {
        // printf %s fa:16:3e:00:00:01 | sha256sum
        assert_eq!(mac_hash("FA:16:3E:00:00:01"), mac_hash("fa:16:3e:00:00:01"));
        assert_eq!(mac_hash("fa:16:3e:00:00:01").len(), 64);
        let expect: String = Sha256::digest(b"fa:16:3e:00:00:01")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(mac_hash("fa:16:3e:00:00:01"), expect);
    }

    #[test]
    fn default_routes_parse() {
        let r = default_routes(ROUTES);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1], ("eth0".to_string(), Ipv4Addr::new(10, 0, 0, 1), 100));
        assert_eq!(r[0].1, Ipv4Addr::new(192, 168, 1, 1));
        assert!(default_routes("garbage\nmore garbage").is_empty());
    }

    #[test]
    fn assembles_nics() {
        let ifaces = vec![
            ("eth0".to_string(), 1500, "fa:16:3e:00:00:01".to_string()),
            ("eth1".to_string(), 9000, "fa:16:3e:00:00:02".to_string()),
            ("eth2".to_string(), 1500, String::new()),
        ];
        let a = |n: &str, ip: &str, m: &str| IfAddr {
            name: n.into(),
            addr: ip.parse().unwrap(),
            netmask: Some(m.parse().unwrap()),
        };
        let addrs = vec![
            a("eth0", "10.0.0.5", "255.255.255.0"),
            a("eth0", "fe80::1", "ffff:ffff:ffff:ffff::"),
            a("eth0", "2001:db8::5", "ffff:ffff:ffff:ffff::"),
            a("eth1", "192.168.1.9", "255.255.0.0"),
        ];
        let n = assemble(&ifaces, &addrs, ROUTES);
        assert_eq!(n.default_ip, "10.0.0.5");
        assert_eq!(n.networks[0].gateway, "10.0.0.1");
        assert_eq!(n.networks[0].netmask, "255.255.255.0");
        assert_eq!(n.networks[0].ipv6.as_deref(), Some("2001:db8::5"));
        assert_eq!(n.networks[1].gateway, "192.168.1.1");
        assert_eq!(n.networks[1].mtu, 9000);
        assert_eq!(n.networks[2].ip, "");
        assert_eq!(n.networks[2].mac, "");
        // No default route: the first NIC with an address.
        let n = assemble(&ifaces[1..], &addrs, "");
        assert_eq!(n.default_ip, "192.168.1.9");
    }

    #[test]
    fn skips_virtual_interfaces_in_a_fake_sysfs() {
        let t = tempfile::tempdir().unwrap();
        for (n, tun) in [
            ("eth0", false),
            ("lo", false),
            ("docker0", false),
            ("veth12", false),
            ("tap0", true),
            ("br-x", false),
        ] {
            let d = t.path().join("sys/class/net").join(n);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("mtu"), "1500\n").unwrap();
            fs::write(d.join("address"), "02:00:00:00:00:01\n").unwrap();
            if tun {
                fs::write(d.join("tun_flags"), "0x1002\n").unwrap();
            }
        }
        let mut w = Warnings::default();
        let n = networks(t.path(), &[], &mut w);
        let names: Vec<_> = n.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, vec!["eth0"]);
        let n = networks(t.path(), &["tap0".to_string()], &mut w);
        let names: Vec<_> = n.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, vec!["eth0", "tap0"]);
    }
}
