//! ATTACH_TO_MCG / DETACH_FROM_MCG (reference §4.14): same layout.

use super::{CmdError, Command, Opcode};
use crate::layout::BitField;

macro_rules! mcg_command {
    ($(#[$m:meta])* $name:ident, $op:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            /// UD QP.
            pub qpn: u32,
            /// Multicast GID, network order.
            pub mgid: [u8; 16],
        }

        impl Command for $name {
            const OPCODE: Opcode = $op;
            type Reply = ();
            fn inlen(&self) -> usize {
                0x20
            }
            fn outlen(&self) -> usize {
                0x10
            }
            fn encode(&self, i: &mut [u8]) {
                BitField::dw(0x08, 23, 0).set(i, self.qpn);
                if let Some(d) = i.get_mut(0x10..0x20) {
                    d.copy_from_slice(&self.mgid);
                }
            }
            fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
                Ok(())
            }
        }
    };
}

mcg_command!(
    /// ATTACH_TO_MCG: deliver packets for `mgid` to `qpn`.
    AttachMcg, Opcode::ATTACH_TO_MCG
);
mcg_command!(
    /// DETACH_FROM_MCG.
    DetachMcg, Opcode::DETACH_FROM_MCG
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::encode_input;

    #[test]
    fn attach_and_detach_golden() {
        let mut mgid = [0u8; 16];
        mgid[0] = 0xff;
        mgid[1] = 0x12;
        mgid[15] = 0x01;
        let a = encode_input(&AttachMcg { qpn: 0x48, mgid });
        assert_eq!(
            &a[..0x10],
            &[0x08, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x48, 0, 0, 0, 0]
        );
        assert_eq!(&a[0x10..], &mgid);
        let d = encode_input(&DetachMcg { qpn: 0x48, mgid });
        assert_eq!(&d[..4], &[0x08, 0x07, 0, 0]);
    }
}
