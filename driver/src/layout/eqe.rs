//! Event queue entries (reference §5.2, §5.4).

use super::{BitField, be16, be32};

/// Size of one EQE.
pub const EQE_LEN: usize = 64;
/// Offset of the owner byte.
pub const OWNER: usize = 0x3F;
/// Event type byte.
pub const TYPE: usize = 0x01;
/// Event subtype byte.
pub const SUB_TYPE: usize = 0x03;
/// Start of the event data.
pub const DATA: usize = 0x20;

/// Event types used by this driver (§5.4).
pub mod event {
    /// CQ completion.
    pub const COMPLETION: u8 = 0x00;
    /// Path migrated.
    pub const PATH_MIG: u8 = 0x01;
    /// Communication established.
    pub const COMM_EST: u8 = 0x02;
    /// SQ drained.
    pub const SQ_DRAINED: u8 = 0x03;
    /// CQ error.
    pub const CQ_ERROR: u8 = 0x04;
    /// WQ catastrophic error.
    pub const WQ_CATAS: u8 = 0x05;
    /// Path migration failed.
    pub const PATH_MIG_FAILED: u8 = 0x07;
    /// Port state change.
    pub const PORT_CHANGE: u8 = 0x09;
    /// Command completion.
    pub const CMD: u8 = 0x0A;
    /// Firmware page request.
    pub const PAGE_REQUEST: u8 = 0x0B;
    /// WQ invalid request.
    pub const WQ_INVAL_REQ: u8 = 0x10;
    /// WQ access violation.
    pub const WQ_ACCESS: u8 = 0x11;
    /// SRQ catastrophic error.
    pub const SRQ_CATAS: u8 = 0x12;
    /// Last WQE reached.
    pub const LAST_WQE: u8 = 0x13;
    /// SRQ limit reached.
    pub const SRQ_LIMIT: u8 = 0x14;
}

/// The asynchronous event mask of one EQ serving commands, pages and all
/// async events: 0x1F02BE | 0xC00 (§5.4).
pub const ASYNC_EVENT_MASK: u64 = 0x001F_0EBE;

/// Command completion: bitmask of completed slots (BE32 at 0x20).
pub const CMD_SLOTS: BitField = BitField::dw(0x20, 31, 0);
/// Page request: embedded-CPU function / release-all bits (BE16 at 0x20).
pub const PAGE_EC_FUNCTION: usize = 0x20;
/// Page request: function id (BE16 at 0x22).
pub const PAGE_FUNCTION_ID: usize = 0x22;
/// Page request: signed page count (BE32 at 0x24).
pub const PAGE_NUM_PAGES: usize = 0x24;
/// Port change: port number in byte 0x28 bits 7:4.
pub const PORT_NUM: BitField = BitField::dw(0x28, 31, 28);
/// QP/SRQ/CQ number of resource events (0x38 bits 23:0; CQ error 0x20).
pub const RES_NUM: BitField = BitField::dw(0x38, 23, 0);
/// CQ error: CQN at 0x20 bits 23:0.
pub const CQ_ERR_CQN: BitField = BitField::dw(0x20, 23, 0);
/// CQ error syndrome byte.
pub const CQ_ERR_SYNDROME: usize = 0x2B;

/// Port change subtypes (§5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PortChange {
    /// Port went down.
    Down,
    /// Port became active.
    Active,
    /// Port initialized.
    Initialized,
    /// LID changed.
    LidChange,
    /// P_Key table changed.
    PkeyChange,
    /// GUID changed.
    GuidChange,
    /// SM asks clients to re-register (SM restart).
    ClientReregister,
    /// Anything else, kept for logs.
    Unknown(u8),
}

impl PortChange {
    /// Decodes a subtype byte.
    pub fn from_subtype(s: u8) -> PortChange {
        match s {
            1 => PortChange::Down,
            4 => PortChange::Active,
            5 => PortChange::Initialized,
            6 => PortChange::LidChange,
            7 => PortChange::PkeyChange,
            8 => PortChange::GuidChange,
            9 => PortChange::ClientReregister,
            o => PortChange::Unknown(o),
        }
    }
}

/// A decoded EQE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eqe {
    /// Completion on a CQ.
    Completion {
        /// CQ number.
        cqn: u32,
    },
    /// Command slots completed.
    Command {
        /// Bitmask of slots.
        slots: u32,
    },
    /// Firmware wants pages (positive) or returns them (negative).
    PageRequest {
        /// Function the pages are for.
        function_id: u16,
        /// Signed count.
        num_pages: i32,
        /// "Release all" (bit 14 of ec_function).
        release_all: bool,
    },
    /// Port state change.
    Port {
        /// 1-based port.
        port: u8,
        /// What changed.
        change: PortChange,
    },
    /// CQ error.
    CqError {
        /// CQ number.
        cqn: u32,
        /// 1 overrun, 2 access violation.
        syndrome: u8,
    },
    /// A QP/SRQ affiliated event.
    Resource {
        /// Event type.
        kind: u8,
        /// QPN or SRQN.
        num: u32,
    },
    /// Any other type, kept for logs.
    Other {
        /// Event type.
        kind: u8,
        /// Subtype.
        sub_type: u8,
    },
}

impl Eqe {
    /// Decodes a 64-byte EQE. Never panics.
    pub fn parse(e: &[u8; EQE_LEN]) -> Eqe {
        let kind = e[TYPE];
        let sub_type = e[SUB_TYPE];
        match kind {
            event::COMPLETION => Eqe::Completion {
                cqn: RES_NUM.get(e),
            },
            event::CMD => Eqe::Command {
                slots: CMD_SLOTS.get(e),
            },
            event::PAGE_REQUEST => Eqe::PageRequest {
                function_id: be16(e, PAGE_FUNCTION_ID),
                num_pages: be32(e, PAGE_NUM_PAGES) as i32,
                release_all: be16(e, PAGE_EC_FUNCTION) & (1 << 14) != 0,
            },
            event::PORT_CHANGE => Eqe::Port {
                port: PORT_NUM.get(e) as u8,
                change: PortChange::from_subtype(sub_type),
            },
            event::CQ_ERROR => Eqe::CqError {
                cqn: CQ_ERR_CQN.get(e),
                syndrome: e[CQ_ERR_SYNDROME],
            },
            event::PATH_MIG
            | event::COMM_EST
            | event::SQ_DRAINED
            | event::WQ_CATAS
            | event::PATH_MIG_FAILED
            | event::WQ_INVAL_REQ
            | event::WQ_ACCESS
            | event::SRQ_CATAS
            | event::LAST_WQE
            | event::SRQ_LIMIT => Eqe::Resource {
                kind,
                num: RES_NUM.get(e),
            },
            _ => Eqe::Other { kind, sub_type },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_request_golden() {
        // §5.4: type 0x0B; 0x20 ec_function, 0x22 function_id, 0x24 num_pages (signed BE32).
        let mut e = [0u8; EQE_LEN];
        e[0x01] = 0x0B;
        e[0x22] = 0x00;
        e[0x23] = 0x00;
        e[0x24..0x28].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xF0]);
        assert_eq!(
            Eqe::parse(&e),
            Eqe::PageRequest {
                function_id: 0,
                num_pages: -16,
                release_all: false
            }
        );
    }

    #[test]
    fn port_change_golden() {
        let mut e = [0u8; EQE_LEN];
        e[0x01] = 0x09;
        e[0x03] = 9;
        e[0x28] = 0x10; // port 1 in bits 7:4
        assert_eq!(
            Eqe::parse(&e),
            Eqe::Port {
                port: 1,
                change: PortChange::ClientReregister
            }
        );
    }

    #[test]
    fn command_completion_golden() {
        let mut e = [0u8; EQE_LEN];
        e[0x01] = 0x0A;
        e[0x20..0x24].copy_from_slice(&[0x80, 0x00, 0x00, 0x01]);
        assert_eq!(Eqe::parse(&e), Eqe::Command { slots: 0x8000_0001 });
    }

    #[test]
    fn mask_is_the_reference_value() {
        assert_eq!(ASYNC_EVENT_MASK, 0x1F02BE | 0xC00);
    }
}
