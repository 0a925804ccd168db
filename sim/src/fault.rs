//! Faults the software HCA can be told to produce.
//!
//! Each has a textual form used on the command line (`--sim-fault`):
//!
//! | form | effect |
//! |---|---|
//! | `cmd-timeout=OPCODE` | firmware never completes commands with this opcode |
//! | `cmd-error=OPCODE:STATUS[:SYNDROME]` | commands with this opcode fail with this status |
//! | `health=SYND[:after=OPCODE]` | after OPCODE (default INIT_HCA 0x102) completes, firmware raises health syndrome SYND with recovery required and stops |
//! | `slow-start=MS` | `initializing` stays set for MS milliseconds after power-up and reset |
//! | `page-storm=ROUNDS[:PAGES]` | once an EQ takes page requests, firmware asks ROUNDS times for PAGES pages (default 64) and later hands each batch back |
//! | `tx-sink=on` | sends (except QP1's MADs) are executed (every byte read through the IOMMU, offloads applied) and completed, but never put on the wire: for measuring what drives the HCA without the fabric |
//!
//! Numbers are decimal or `0x` hexadecimal.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Never complete this opcode.
    CmdTimeout {
        /// Opcode.
        opcode: u16,
    },
    /// Fail this opcode.
    CmdError {
        /// Opcode.
        opcode: u16,
        /// Command status.
        status: u8,
        /// Syndrome.
        syndrome: u32,
    },
    /// Health syndrome after an opcode.
    Health {
        /// Health syndrome.
        synd: u8,
        /// Raised once this opcode completed.
        after: u16,
    },
    /// Slow firmware start.
    SlowStart(Duration),
    /// Page request storm.
    PageStorm {
        /// Number of requests.
        rounds: u32,
        /// Pages per request.
        pages: u32,
    },
    /// Sends complete without leaving the HCA.
    TxSink,
}

/// A fault string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fault `{spec}`: {why} (see --help for the forms)")]
pub struct FaultParseError {
    spec: String,
    why: &'static str,
}

fn num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(spec: &str) -> Result<Fault, FaultParseError> {
        let err = |why| FaultParseError {
            spec: spec.to_string(),
            why,
        };
        let (kind, args) = spec.split_once('=').ok_or_else(|| err("missing `=`"))?;
        let parts: Vec<&str> = args.split(':').collect();
        let n = |i: usize, what: &'static str| -> Result<u64, FaultParseError> {
            parts.get(i).and_then(|p| num(p)).ok_or_else(|| err(what))
        };
        let opcode = |i| -> Result<u16, FaultParseError> {
            u16::try_from(n(i, "bad opcode")?).map_err(|_| err("opcode is 16 bits"))
        };
        match kind {
            "cmd-timeout" => Ok(Fault::CmdTimeout { opcode: opcode(0)? }),
            "cmd-error" => {
                let status =
                    u8::try_from(n(1, "missing status")?).map_err(|_| err("status is 8 bits"))?;
                if status == 0 {
                    return Err(err("status 0 is success"));
                }
                let syndrome = match parts.get(2) {
                    Some(_) => u32::try_from(n(2, "bad syndrome")?)
                        .map_err(|_| err("syndrome is 32 bits"))?,
                    None => 0x5EED_0000 | u32::from(status),
                };
                Ok(Fault::CmdError {
                    opcode: opcode(0)?,
                    status,
                    syndrome,
                })
            }
            "health" => {
                let synd =
                    u8::try_from(n(0, "bad syndrome")?).map_err(|_| err("syndrome is 8 bits"))?;
                if synd == 0 {
                    return Err(err("syndrome 0 means healthy"));
                }
                let after = match parts.get(1) {
                    Some(p) => {
                        let v = p
                            .strip_prefix("after=")
                            .ok_or_else(|| err("expected after=OPCODE"))?;
                        num(v)
                            .and_then(|v| u16::try_from(v).ok())
                            .ok_or_else(|| err("bad opcode"))?
                    }
                    None => 0x102,
                };
                Ok(Fault::Health { synd, after })
            }
            "slow-start" => Ok(Fault::SlowStart(Duration::from_millis(n(
                0,
                "bad milliseconds",
            )?))),
            "page-storm" => {
                let rounds =
                    u32::try_from(n(0, "bad round count")?).map_err(|_| err("too many rounds"))?;
                let pages = match parts.get(1) {
                    Some(_) => {
                        u32::try_from(n(1, "bad page count")?).map_err(|_| err("too many pages"))?
                    }
                    None => 64,
                };
                if pages == 0 || pages > 1 << 20 {
                    return Err(err("pages must be 1..=1048576"));
                }
                Ok(Fault::PageStorm { rounds, pages })
            }
            "tx-sink" if args == "on" => Ok(Fault::TxSink),
            "tx-sink" => Err(err("expected tx-sink=on")),
            _ => Err(err("unknown fault kind")),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::CmdTimeout { opcode } => write!(f, "cmd-timeout={opcode:#x}"),
            Fault::CmdError {
                opcode,
                status,
                syndrome,
            } => write!(f, "cmd-error={opcode:#x}:{status:#x}:{syndrome:#x}"),
            Fault::Health { synd, after } => write!(f, "health={synd:#x}:after={after:#x}"),
            Fault::SlowStart(d) => write!(f, "slow-start={}", d.as_millis()),
            Fault::PageStorm { rounds, pages } => write!(f, "page-storm={rounds}:{pages}"),
            Fault::TxSink => write!(f, "tx-sink=on"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "cmd-timeout=0x100".parse(),
            Ok(Fault::CmdTimeout { opcode: 0x100 })
        );
        assert_eq!(
            "cmd-error=0x301:3:0x1234".parse(),
            Ok(Fault::CmdError {
                opcode: 0x301,
                status: 3,
                syndrome: 0x1234
            })
        );
        assert_eq!(
            "health=8".parse(),
            Ok(Fault::Health {
                synd: 8,
                after: 0x102
            })
        );
        assert_eq!(
            "health=0x0b:after=0x800".parse(),
            Ok(Fault::Health {
                synd: 0xb,
                after: 0x800
            })
        );
        assert_eq!(
            "slow-start=250".parse(),
            Ok(Fault::SlowStart(Duration::from_millis(250)))
        );
        assert_eq!(
            "page-storm=10".parse(),
            Ok(Fault::PageStorm {
                rounds: 10,
                pages: 64
            })
        );
        for f in [
            "cmd-timeout=0x100",
            "page-storm=3:7",
            "health=0x8:after=0x102",
            "tx-sink=on",
        ] {
            let p: Fault = f.parse().unwrap();
            assert_eq!(p.to_string().parse::<Fault>().unwrap(), p);
        }
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "cmd-timeout",
            "cmd-timeout=x",
            "cmd-timeout=0x10000",
            "cmd-error=0x100",
            "cmd-error=0x100:0",
            "health=0",
            "health=8:later",
            "page-storm=1:0",
            "tx-sink=off",
            "bogus=1",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }
}
