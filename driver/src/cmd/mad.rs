//! MAD_IFC (reference §4.16): local SMP queries answered by the HCA's own
//! management agent.

use super::{CmdError, Command, Opcode};
use crate::layout::BitField;
use crate::layout::smp::MAD_LEN;

/// MAD_IFC for a local query (op_mod 0x3: skip M_Key and B_Key checks).
#[derive(Clone, Debug)]
pub struct MadIfc {
    /// 1-based port.
    pub port: u8,
    /// The request MAD.
    pub mad: [u8; MAD_LEN],
}

impl Command for MadIfc {
    const OPCODE: Opcode = Opcode::MAD_IFC;
    type Reply = [u8; MAD_LEN];
    fn op_mod(&self) -> u16 {
        0x3
    }
    fn inlen(&self) -> usize {
        0x10 + MAD_LEN
    }
    fn outlen(&self) -> usize {
        0x10 + MAD_LEN
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(0x08, 7, 0).set(i, u32::from(self.port));
        if let Some(dst) = i.get_mut(0x10..0x10 + MAD_LEN) {
            dst.copy_from_slice(&self.mad);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<[u8; MAD_LEN], CmdError> {
        let mut m = [0u8; MAD_LEN];
        let src = o
            .get(0x10..0x10 + MAD_LEN)
            .ok_or_else(|| CmdError::BadOutput {
                opcode: Self::OPCODE,
                why: "short MAD".into(),
            })?;
        m.copy_from_slice(src);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::encode_input;
    use crate::layout::smp::{attr, smp_get};

    #[test]
    fn mad_ifc_golden() {
        let c = MadIfc {
            port: 1,
            mad: smp_get(7, attr::PORT_INFO, 1),
        };
        let v = encode_input(&c);
        assert_eq!(v.len(), 0x110);
        assert_eq!(
            &v[..0x10],
            &[0x05, 0x0D, 0, 0, 0, 0, 0, 0x03, 0, 0, 0, 0x01, 0, 0, 0, 0]
        );
        assert_eq!(&v[0x10..0x14], &[0x01, 0x01, 0x01, 0x01]);
    }
}
