//! A minimal pcap writer for raw InfiniBand packets.
//!
//! Records start at the LRH. The link type is DLT_USER0 (147): tshark 4.0
//! has no reader for LINKTYPE_INFINIBAND (247) but decodes user DLT 0 as
//! InfiniBand with `-o 'uat:user_dlts:"User 0 (DLT=147)","infiniband","0","","0",""'`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// DLT_USER0.
pub const LINKTYPE_USER0: u32 = 147;

/// The tshark preference that decodes [`LINKTYPE_USER0`] as InfiniBand.
pub const TSHARK_INFINIBAND_DLT: &str =
    r#"uat:user_dlts:"User 0 (DLT=147)","infiniband","0","","0","""#;

/// Runs `tshark -r CAPTURE ARGS…` with the InfiniBand decoding set and
/// returns what it printed. For tests and tools: an error says what to
/// install or what tshark complained about.
pub fn tshark(capture: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("tshark")
        .args(["-o", TSHARK_INFINIBAND_DLT, "-r"])
        .arg(capture)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run tshark ({e}); cargo xtask test installs it"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An open capture file.
#[derive(Debug)]
pub struct PcapWriter {
    out: BufWriter<File>,
}

impl PcapWriter {
    /// Creates `path` and writes the file header.
    pub fn create(path: &Path) -> io::Result<PcapWriter> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&0xA1B2_C3D4u32.to_le_bytes())?;
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&65_535u32.to_le_bytes())?;
        out.write_all(&LINKTYPE_USER0.to_le_bytes())?;
        Ok(PcapWriter { out })
    }

    /// Appends one packet.
    pub fn write(&mut self, pkt: &[u8]) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let len = u32::try_from(pkt.len()).unwrap_or(u32::MAX);
        self.out.write_all(&(now.as_secs() as u32).to_le_bytes())?;
        self.out.write_all(&now.subsec_micros().to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(pkt)
    }

    /// Flushes buffered records.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
