//! The subnet manager and its SA, as the fabric runs them.
//!
//! Partitions come from a file in a documented subset of OpenSM's
//! `partitions.conf`:
//!
//! ```text
//! # comment
//! Name=PKEY[, ipoib][, mtu=N][, rate=N][, sl=N][, scope=N][, defmember=full|limited] : MEMBER[, MEMBER]* ;
//! MEMBER = ALL | ALL_CAS | 0xPORTGUID, optionally followed by =full, =limited or =both
//! ```
//!
//! As OpenSM does, members are limited unless marked full (or `defmember=full`),
//! the default partition 0x7FFF is always present with every port a full
//! member unless the file names it, and every `ipoib` partition gets its
//! IPv4 broadcast group created by the SM (MGID `ff1S:401b:PKEY|8000::ffff:ffff`,
//! Q_Key 0x0B1B, MTU/rate/SL from the line, defaults mtu=4, rate=3, sl=0, scope=2).
//!
//! The SA answers SubnAdmGet(PathRecord) and SubnAdmSet/Delete(MCMemberRecord)
//! single-MAD requests on QP1 at LID 1. Multicast forwarding follows the
//! membership it records (full and non members receive, send-only members
//! do not).

use std::collections::BTreeMap;

/// The IPoIB Q_Key OpenSM gives broadcast groups.
pub const IPOIB_QKEY: u32 = 0x0000_0B1B;
/// First MLID.
pub const MLID_BASE: u16 = 0xC000;
/// GID prefix of the subnet.
pub const SUBNET_PREFIX: u64 = 0xFE80_0000_0000_0000;

/// SA status codes (MAD status bits 15:8).
#[allow(missing_docs)]
pub mod sa_status {
    pub const NO_RESOURCES: u16 = 0x0100;
    pub const REQ_INVALID: u16 = 0x0200;
    pub const NO_RECORDS: u16 = 0x0300;
    pub const INVALID_GID: u16 = 0x0500;
    pub const INSUFFICIENT_COMPONENTS: u16 = 0x0600;
    /// Common MAD status: method/attribute not supported.
    pub const UNSUPPORTED: u16 = 0x000C;
}

/// Who a partition line names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    /// Every port.
    All,
    /// One port GUID.
    Guid(u64),
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Name.
    pub name: String,
    /// 15-bit P_Key.
    pub pkey: u16,
    /// Create the IPoIB broadcast group.
    pub ipoib: bool,
    /// Group MTU code.
    pub mtu: u8,
    /// Group rate code.
    pub rate: u8,
    /// Group SL.
    pub sl: u8,
    /// Group scope.
    pub scope: u8,
    /// Members and whether each is full.
    pub members: Vec<(Member, bool)>,
}

/// A partitions file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partitions line {line}: {why}")]
pub struct PartitionError {
    /// 1-based line (of the statement's start).
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

fn num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a partitions file.
pub fn parse_partitions(text: &str) -> Result<Vec<Partition>, PartitionError> {
    let mut out = Vec::new();
    let mut stmt = String::new();
    let mut start = 1;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        if stmt.trim().is_empty() {
            start = n + 1;
        }
        stmt.push_str(line);
        stmt.push(' ');
        while let Some(end) = stmt.find(';') {
            let s: String = stmt[..end].to_string();
            stmt = stmt[end + 1..].to_string();
            if !s.trim().is_empty() {
                out.push(parse_statement(&s).map_err(|why| PartitionError { line: start, why })?);
            }
            start = n + 1;
        }
    }
    if !stmt.trim().is_empty() {
        return Err(PartitionError {
            line: start,
            why: "statement not terminated by `;`".into(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &out {
        if !seen.insert(p.pkey) {
            return Err(PartitionError {
                line: 0,
                why: format!("P_Key {:#06x} defined twice", p.pkey),
            });
        }
    }
    Ok(out)
}

fn parse_statement(s: &str) -> Result<Partition, String> {
    let (head, members) = s
        .split_once(':')
        .ok_or("missing `:` before the member list")?;
    let mut parts = head.split(',');
    let def = parts.next().ok_or("empty partition definition")?;
    let (name, pkey) = def.split_once('=').ok_or("expected Name=PKEY")?;
    let name = name.trim().to_string();
    if name.is_empty() {
        return Err("empty partition name".into());
    }
    let pkey = num(pkey).filter(|&v| v <= 0xFFFF).ok_or("bad P_Key")? as u16 & 0x7FFF;
    if pkey == 0 {
        return Err("P_Key 0 is invalid".into());
    }
    let mut p = Partition {
        name,
        pkey,
        ipoib: false,
        mtu: 4,
        rate: 3,
        sl: 0,
        scope: 2,
        members: Vec::new(),
    };
    let mut defmember_full = false;
    for flag in parts {
        let flag = flag.trim();
        let (k, v) = flag
            .split_once('=')
            .map_or((flag, None), |(k, v)| (k.trim(), Some(v.trim())));
        let val = |lo: u64, hi: u64| -> Result<u8, String> {
            v.and_then(num)
                .filter(|x| (lo..=hi).contains(x))
                .map(|x| x as u8)
                .ok_or(format!("bad value for {k}"))
        };
        match k {
            "ipoib" => p.ipoib = true,
            "mtu" => p.mtu = val(1, 5)?,
            "rate" => p.rate = val(2, 22)?,
            "sl" => p.sl = val(0, 15)?,
            "scope" => p.scope = val(1, 15)?,
            "defmember" => {
                defmember_full = match v {
                    Some("full") | Some("both") => true,
                    Some("limited") => false,
                    _ => return Err("defmember must be full, limited or both".into()),
                }
            }
            "" => {}
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    for m in members.split(',') {
        let m = m.trim();
        if m.is_empty() {
            continue;
        }
        let (who, kind) = m
            .split_once('=')
            .map_or((m, None), |(a, b)| (a.trim(), Some(b.trim())));
        let full = match kind {
            None => defmember_full,
            Some("full") | Some("both") => true,
            Some("limited") => false,
            Some(o) => return Err(format!("unknown membership `{o}`")),
        };
        let who = match who {
            "ALL" | "ALL_CAS" | "ALL_SWITCHES" | "ALL_ROUTERS" => Member::All,
            "SELF" => continue,
            g => Member::Guid(num(g).ok_or(format!("bad port GUID `{g}`"))?),
        };
        p.members.push((who, full));
    }
    Ok(p)
}

/// A multicast group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// MGID.
    pub mgid: [u8; 16],
    /// MLID.
    pub mlid: u16,
    /// Q_Key.
    pub qkey: u32,
    /// MTU code.
    pub mtu: u8,
    /// Rate code.
    pub rate: u8,
    /// SL.
    pub sl: u8,
    /// Traffic class.
    pub tclass: u8,
    /// Flow label.
    pub flow_label: u32,
    /// Hop limit.
    pub hop_limit: u8,
    /// P_Key (with the full bit).
    pub pkey: u16,
    /// Scope.
    pub scope: u8,
    /// Member port GIDs and their join state.
    pub members: BTreeMap<[u8; 16], u8>,
    /// Created by the SM (survives being empty).
    pub permanent: bool,
}

/// The broadcast MGID of a partition: `ff1S:401b:PKEY|8000::ffff:ffff`.
pub fn broadcast_mgid(pkey: u16, scope: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0] = 0xFF;
    g[1] = 0x10 | (scope & 0x0F);
    g[2] = 0x40;
    g[3] = 0x1B;
    g[4..6].copy_from_slice(&(pkey | 0x8000).to_be_bytes());
    g[12..16].copy_from_slice(&[0xFF; 4]);
    g
}

/// SM state: partitions and multicast groups.
#[derive(Debug)]
pub struct SmState {
    /// Partitions.
    pub partitions: Vec<Partition>,
    /// Groups by MGID.
    pub groups: BTreeMap<[u8; 16], Group>,
    next_mlid: u16,
}

impl SmState {
    /// The SM with these partitions (the default partition is added if absent).
    pub fn new(mut partitions: Vec<Partition>) -> SmState {
        if !partitions.iter().any(|p| p.pkey == 0x7FFF) {
            partitions.insert(
                0,
                Partition {
                    name: "Default".into(),
                    pkey: 0x7FFF,
                    ipoib: true,
                    mtu: 4,
                    rate: 3,
                    sl: 0,
                    scope: 2,
                    members: vec![(Member::All, true)],
                },
            );
        }
        let mut sm = SmState {
            partitions,
            groups: BTreeMap::new(),
            next_mlid: MLID_BASE,
        };
        sm.create_broadcast_groups();
        sm
    }

    fn create_broadcast_groups(&mut self) {
        for p in self.partitions.clone() {
            if !p.ipoib {
                continue;
            }
            let mgid = broadcast_mgid(p.pkey, p.scope);
            if self.groups.contains_key(&mgid) {
                continue;
            }
            let mlid = self.alloc_mlid();
            self.groups.insert(
                mgid,
                Group {
                    mgid,
                    mlid,
                    qkey: IPOIB_QKEY,
                    mtu: p.mtu,
                    rate: p.rate,
                    sl: p.sl,
                    tclass: 0,
                    flow_label: 0,
                    hop_limit: 0,
                    pkey: p.pkey | 0x8000,
                    scope: p.scope,
                    members: BTreeMap::new(),
                    permanent: true,
                },
            );
        }
    }

    fn alloc_mlid(&mut self) -> u16 {
        let used: std::collections::BTreeSet<u16> = self.groups.values().map(|g| g.mlid).collect();
        let mut m = self.next_mlid;
        while used.contains(&m) {
            m = if m >= 0xFFFE { MLID_BASE } else { m + 1 };
        }
        self.next_mlid = if m >= 0xFFFE { MLID_BASE } else { m + 1 };
        m
    }

    /// The P_Key table the SM programs into the port with `guid`
    /// (the default partition first).
    pub fn pkey_table(&self, guid: u64) -> Vec<u16> {
        let mut t = Vec::new();
        for p in &self.partitions {
            let mut best: Option<bool> = None;
            for (m, full) in &p.members {
                if *m == Member::All || *m == Member::Guid(guid) {
                    best = Some(best.unwrap_or(false) | full);
                }
            }
            if let Some(full) = best {
                let k = p.pkey | if full { 0x8000 } else { 0 };
                if p.pkey == 0x7FFF {
                    t.insert(0, k);
                } else {
                    t.push(k);
                }
            }
        }
        t.truncate(128);
        t
    }

    /// SM restart: groups the clients created are gone, memberships are
    /// forgotten; the SM's own broadcast groups are created anew.
    pub fn restart(&mut self) {
        self.groups.clear();
        self.next_mlid = MLID_BASE;
        self.create_broadcast_groups();
    }

    /// Port GIDs that receive packets sent to `mlid`.
    pub fn receivers(&self, mlid: u16) -> Vec<[u8; 16]> {
        self.groups
            .values()
            .filter(|g| g.mlid == mlid)
            .flat_map(|g| g.members.iter())
            .filter(|(_, js)| **js & 0x3 != 0)
            .map(|(gid, _)| *gid)
            .collect()
    }
}

/// A port GID of this subnet.
pub fn port_gid(guid: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&SUBNET_PREFIX.to_be_bytes());
    g[8..].copy_from_slice(&guid.to_be_bytes());
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_subset() {
        let text = "# partitions\n\
            Default=0x7fff, ipoib, mtu=5 : ALL=full ;\n\
            storage=0x8001, ipoib, mtu=4, rate=7, sl=1 :\n  0x0002c90300000b01=full,\n  ALL ; # limited\n\
            mgmt=0x0002 : 0x0002c90300000a01 ;\n";
        let p = parse_partitions(text).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].pkey, 0x7FFF);
        assert_eq!(p[0].mtu, 5);
        assert_eq!(p[1].pkey, 0x0001, "full bit stripped");
        assert!(p[1].ipoib);
        assert_eq!((p[1].rate, p[1].sl), (7, 1));
        assert_eq!(
            p[1].members,
            vec![
                (Member::Guid(0x0002_c903_0000_0b01), true),
                (Member::All, false)
            ]
        );
        assert!(!p[2].ipoib);
        let sm = SmState::new(p);
        assert_eq!(sm.pkey_table(0x0002_c903_0000_0b01), vec![0xFFFF, 0x8001]);
        // mgmt names its member without `=full`: limited, as in OpenSM.
        assert_eq!(
            sm.pkey_table(0x0002_c903_0000_0a01),
            vec![0xFFFF, 0x0001, 0x0002]
        );
        assert_eq!(sm.groups.len(), 2, "two broadcast groups");
        let g = &sm.groups[&broadcast_mgid(0x0001, 2)];
        assert_eq!(g.pkey, 0x8001);
        assert_eq!(g.qkey, 0x0B1B);
        assert_eq!(g.mtu, 4);
    }

    #[test]
    fn broadcast_mgid_matches_the_reference() {
        // ipoib.md §5.2: ff12:401b:ffff:0000:0000:0000:ffff:ffff.
        assert_eq!(
            broadcast_mgid(0x7FFF, 2),
            [
                0xff, 0x12, 0x40, 0x1b, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff
            ]
        );
    }

    #[test]
    fn rejects_bad_files() {
        for bad in [
            "x=0x1 : ALL",
            "x : ALL ;",
            "=0x1 : ALL ;",
            "x=0x0 : ALL ;",
            "x=0x1, bogus : ALL ;",
            "x=0x1, mtu=9 : ALL ;",
            "x=0x1 : ALL=half ;",
            "x=0x1 : zz ;",
            "a=0x1 : ALL ; b=0x8001 : ALL ;",
        ] {
            assert!(parse_partitions(bad).is_err(), "{bad}");
        }
        assert!(SmState::new(Vec::new()).pkey_table(1) == vec![0xFFFF]);
    }
}
