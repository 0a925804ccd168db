//! Typed mlx5 commands and the command queue that carries them.
//!
//! Each command is a value implementing [`Command`]: it knows its opcode,
//! op_mod and lengths, writes its input body, and decodes its output. The
//! header (opcode, op_mod) and the status check are common and done by
//! [`encode_input`] and [`check_output`]; mailbox chains, tokens,
//! signatures and doorbells live in [`queue::CmdQueue`].

pub mod cq;
pub mod eq;
pub mod hca;
pub mod mad;
pub mod mcg;
pub mod qp;
pub mod queue;
pub mod srq;

use std::fmt;
use std::time::Duration;

use crate::layout::cmd::{IN_OP_MOD, IN_OPCODE, OUT_STATUS, OUT_SYNDROME};

/// A command opcode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Opcode(pub u16);

#[allow(missing_docs)]
impl Opcode {
    pub const QUERY_HCA_CAP: Opcode = Opcode(0x100);
    pub const INIT_HCA: Opcode = Opcode(0x102);
    pub const TEARDOWN_HCA: Opcode = Opcode(0x103);
    pub const ENABLE_HCA: Opcode = Opcode(0x104);
    pub const DISABLE_HCA: Opcode = Opcode(0x105);
    pub const QUERY_PAGES: Opcode = Opcode(0x107);
    pub const MANAGE_PAGES: Opcode = Opcode(0x108);
    pub const SET_HCA_CAP: Opcode = Opcode(0x109);
    pub const QUERY_ISSI: Opcode = Opcode(0x10A);
    pub const SET_ISSI: Opcode = Opcode(0x10B);
    pub const CREATE_MKEY: Opcode = Opcode(0x200);
    pub const DESTROY_MKEY: Opcode = Opcode(0x202);
    pub const QUERY_SPECIAL_CONTEXTS: Opcode = Opcode(0x203);
    pub const CREATE_CQ: Opcode = Opcode(0x400);
    pub const DESTROY_CQ: Opcode = Opcode(0x401);
    pub const MODIFY_CQ: Opcode = Opcode(0x403);
    pub const CREATE_QP: Opcode = Opcode(0x500);
    pub const DESTROY_QP: Opcode = Opcode(0x501);
    pub const RST2INIT_QP: Opcode = Opcode(0x502);
    pub const INIT2RTR_QP: Opcode = Opcode(0x503);
    pub const RTR2RTS_QP: Opcode = Opcode(0x504);
    pub const RTS2RTS_QP: Opcode = Opcode(0x505);
    pub const TO_ERR_QP: Opcode = Opcode(0x507);
    pub const TO_RST_QP: Opcode = Opcode(0x50A);
    pub const ATTACH_TO_MCG: Opcode = Opcode(0x806);
    pub const DETACH_FROM_MCG: Opcode = Opcode(0x807);
    pub const CREATE_SRQ: Opcode = Opcode(0x700);
    pub const DESTROY_SRQ: Opcode = Opcode(0x701);
    pub const ARM_RQ: Opcode = Opcode(0x703);
    pub const CREATE_RMP: Opcode = Opcode(0x90C);
    pub const MODIFY_RMP: Opcode = Opcode(0x90D);
    pub const DESTROY_RMP: Opcode = Opcode(0x90E);
    pub const CREATE_EQ: Opcode = Opcode(0x301);
    pub const DESTROY_EQ: Opcode = Opcode(0x302);
    pub const MAD_IFC: Opcode = Opcode(0x50D);
    pub const ALLOC_PD: Opcode = Opcode(0x800);
    pub const DEALLOC_PD: Opcode = Opcode(0x801);
    pub const ALLOC_UAR: Opcode = Opcode(0x802);
    pub const DEALLOC_UAR: Opcode = Opcode(0x803);
    pub const ACCESS_REG: Opcode = Opcode(0x805);
    pub const NOP: Opcode = Opcode(0x80D);

    /// The PRM name of the opcode.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x100 => "QUERY_HCA_CAP",
            0x101 => "QUERY_ADAPTER",
            0x102 => "INIT_HCA",
            0x103 => "TEARDOWN_HCA",
            0x104 => "ENABLE_HCA",
            0x105 => "DISABLE_HCA",
            0x107 => "QUERY_PAGES",
            0x108 => "MANAGE_PAGES",
            0x109 => "SET_HCA_CAP",
            0x10A => "QUERY_ISSI",
            0x10B => "SET_ISSI",
            0x10D => "SET_DRIVER_VERSION",
            0x200 => "CREATE_MKEY",
            0x201 => "QUERY_MKEY",
            0x202 => "DESTROY_MKEY",
            0x203 => "QUERY_SPECIAL_CONTEXTS",
            0x301 => "CREATE_EQ",
            0x302 => "DESTROY_EQ",
            0x303 => "QUERY_EQ",
            0x400 => "CREATE_CQ",
            0x401 => "DESTROY_CQ",
            0x402 => "QUERY_CQ",
            0x403 => "MODIFY_CQ",
            0x500 => "CREATE_QP",
            0x501 => "DESTROY_QP",
            0x502 => "RST2INIT_QP",
            0x503 => "INIT2RTR_QP",
            0x504 => "RTR2RTS_QP",
            0x505 => "RTS2RTS_QP",
            0x507 => "2ERR_QP",
            0x50A => "2RST_QP",
            0x50B => "QUERY_QP",
            0x50D => "MAD_IFC",
            0x700 => "CREATE_SRQ",
            0x701 => "DESTROY_SRQ",
            0x703 => "ARM_RQ",
            0x762 => "QUERY_HCA_VPORT_CONTEXT",
            0x764 => "QUERY_HCA_VPORT_GID",
            0x765 => "QUERY_HCA_VPORT_PKEY",
            0x800 => "ALLOC_PD",
            0x801 => "DEALLOC_PD",
            0x802 => "ALLOC_UAR",
            0x803 => "DEALLOC_UAR",
            0x805 => "ACCESS_REG",
            0x806 => "ATTACH_TO_MCG",
            0x807 => "DETACH_FROM_MCG",
            0x80D => "NOP",
            0x90C => "CREATE_RMP",
            0x90D => "MODIFY_RMP",
            0x90E => "DESTROY_RMP",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.0)
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Command status from output byte 0 (§2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub enum CmdStatus {
    Ok,
    InternalError,
    BadOperation,
    BadParameter,
    BadSystemState,
    BadResource,
    ResourceBusy,
    NotReady,
    LimitsExceeded,
    BadResourceState,
    BadIndex,
    NoResources,
    BadQpState,
    BadPacket,
    BadSizeOutstandingCqes,
    BadInputLength,
    BadOutputLength,
    Unknown(u8),
}

impl CmdStatus {
    /// Decodes the status byte.
    pub fn from_u8(v: u8) -> CmdStatus {
        use CmdStatus::*;
        match v {
            0x00 => Ok,
            0x01 => InternalError,
            0x02 => BadOperation,
            0x03 => BadParameter,
            0x04 => BadSystemState,
            0x05 => BadResource,
            0x06 => ResourceBusy,
            0x07 => NotReady,
            0x08 => LimitsExceeded,
            0x09 => BadResourceState,
            0x0A => BadIndex,
            0x0F => NoResources,
            0x10 => BadQpState,
            0x30 => BadPacket,
            0x40 => BadSizeOutstandingCqes,
            0x50 => BadInputLength,
            0x51 => BadOutputLength,
            o => Unknown(o),
        }
    }

    /// The raw byte.
    pub fn code(self) -> u8 {
        use CmdStatus::*;
        match self {
            Ok => 0x00,
            InternalError => 0x01,
            BadOperation => 0x02,
            BadParameter => 0x03,
            BadSystemState => 0x04,
            BadResource => 0x05,
            ResourceBusy => 0x06,
            NotReady => 0x07,
            LimitsExceeded => 0x08,
            BadResourceState => 0x09,
            BadIndex => 0x0A,
            NoResources => 0x0F,
            BadQpState => 0x10,
            BadPacket => 0x30,
            BadSizeOutstandingCqes => 0x40,
            BadInputLength => 0x50,
            BadOutputLength => 0x51,
            Unknown(v) => v,
        }
    }

    /// The header's name for the status.
    pub fn name(self) -> &'static str {
        use CmdStatus::*;
        match self {
            Ok => "OK",
            InternalError => "INT_ERR",
            BadOperation => "BAD_OP_ERR",
            BadParameter => "BAD_PARAM_ERR",
            BadSystemState => "BAD_SYS_STATE_ERR",
            BadResource => "BAD_RES_ERR",
            ResourceBusy => "RES_BUSY",
            NotReady => "NOT_READY",
            LimitsExceeded => "LIM_ERR",
            BadResourceState => "BAD_RES_STATE_ERR",
            BadIndex => "IX_ERR",
            NoResources => "NO_RES_ERR",
            BadQpState => "BAD_QP_STATE_ERR",
            BadPacket => "BAD_PKT_ERR",
            BadSizeOutstandingCqes => "BAD_SIZE_OUTS_CQES_ERR",
            BadInputLength => "BAD_INP_LEN_ERR",
            BadOutputLength => "BAD_OUTP_LEN_ERR",
            Unknown(_) => "UNKNOWN_STATUS",
        }
    }
}

impl fmt::Display for CmdStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#04x})", self.name(), self.code())
    }
}

/// Delivery status from `status_own` bits 7:1 (§2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub enum DeliveryStatus {
    Ok,
    SignatureError,
    TokenError,
    BadBlockNumber,
    OutputPointerNotAligned,
    InputPointerNotAligned,
    FirmwareInternalError,
    InputLengthError,
    OutputLengthError,
    ReservedNotZero,
    BadCommandType,
    Unknown(u8),
}

impl DeliveryStatus {
    /// Decodes the 7-bit value.
    pub fn from_u8(v: u8) -> DeliveryStatus {
        use DeliveryStatus::*;
        match v {
            0x00 => Ok,
            0x01 => SignatureError,
            0x02 => TokenError,
            0x03 => BadBlockNumber,
            0x04 => OutputPointerNotAligned,
            0x05 => InputPointerNotAligned,
            0x06 => FirmwareInternalError,
            0x07 => InputLengthError,
            0x08 => OutputLengthError,
            0x09 => ReservedNotZero,
            0x10 => BadCommandType,
            o => Unknown(o),
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DeliveryStatus::Ok => "ok",
            DeliveryStatus::SignatureError => "signature error",
            DeliveryStatus::TokenError => "token error",
            DeliveryStatus::BadBlockNumber => "bad block number",
            DeliveryStatus::OutputPointerNotAligned => "output mailbox pointer not aligned",
            DeliveryStatus::InputPointerNotAligned => "input mailbox pointer not aligned",
            DeliveryStatus::FirmwareInternalError => "firmware internal error",
            DeliveryStatus::InputLengthError => "input length error",
            DeliveryStatus::OutputLengthError => "output length error",
            DeliveryStatus::ReservedNotZero => "reserved field not cleared",
            DeliveryStatus::BadCommandType => "bad command descriptor type",
            DeliveryStatus::Unknown(v) => return write!(f, "unknown delivery status {v:#04x}"),
        };
        f.write_str(s)
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Firmware executed the command and reported an error.
    #[error("{opcode} op_mod {op_mod:#x} failed: status {status}, syndrome {syndrome:#010x}")]
    Failed {
        /// Opcode.
        opcode: Opcode,
        /// Opcode modifier.
        op_mod: u16,
        /// Decoded status.
        status: CmdStatus,
        /// Firmware syndrome.
        syndrome: u32,
    },
    /// Firmware could not take the command from the queue.
    #[error("{opcode} op_mod {op_mod:#x} was not delivered: {status}")]
    Delivery {
        /// Opcode.
        opcode: Opcode,
        /// Opcode modifier.
        op_mod: u16,
        /// Delivery status.
        status: DeliveryStatus,
    },
    /// Firmware did not complete the command in time.
    #[error("{opcode} op_mod {op_mod:#x} timed out after {} ms", after.as_millis())]
    Timeout {
        /// Opcode.
        opcode: Opcode,
        /// Opcode modifier.
        op_mod: u16,
        /// How long we waited.
        after: Duration,
    },
    /// The output did not make sense.
    #[error("{opcode} returned a malformed output: {why}")]
    BadOutput {
        /// Opcode.
        opcode: Opcode,
        /// What was wrong.
        why: String,
    },
    /// The device is in a fatal state; the command was not issued or abandoned.
    #[error("{opcode} abandoned: the device is in a fatal state")]
    DeviceFatal {
        /// Opcode.
        opcode: Opcode,
        /// What the health sensors found.
        #[source]
        cause: crate::health::Fatal,
    },
    /// No command slot is free (all stuck after timeouts).
    #[error("no free command slot for {0}")]
    NoSlot(Opcode),
    /// DMA or interrupt plumbing failed.
    #[error("transport failure while executing {opcode}")]
    Transport {
        /// Opcode.
        opcode: Opcode,
        /// The cause.
        #[source]
        source: crate::transport::TransportError,
    },
}

impl CmdError {
    /// The command status, when firmware returned one.
    pub fn status(&self) -> Option<CmdStatus> {
        match self {
            CmdError::Failed { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One mlx5 command.
pub trait Command {
    /// Its opcode.
    const OPCODE: Opcode;
    /// What a successful output decodes to.
    type Reply;
    /// The opcode of this value: [`Command::OPCODE`] unless one type covers
    /// several opcodes (QP transitions).
    fn opcode(&self) -> Opcode {
        Self::OPCODE
    }
    /// Opcode modifier.
    fn op_mod(&self) -> u16 {
        0
    }
    /// Input length in bytes (full structure size).
    fn inlen(&self) -> usize;
    /// Output length in bytes.
    fn outlen(&self) -> usize;
    /// Writes the command-specific input (from 0x08 on) into a zeroed buffer
    /// whose header is already set.
    fn encode(&self, inbox: &mut [u8]);
    /// Decodes a successful output.
    fn decode(&self, outbox: &[u8]) -> Result<Self::Reply, CmdError>;
}

/// The complete input of `cmd`: header plus body.
pub fn encode_input<C: Command>(cmd: &C) -> Vec<u8> {
    let mut v = vec![0u8; cmd.inlen().max(16)];
    IN_OPCODE.set(&mut v, u32::from(cmd.opcode().0));
    IN_OP_MOD.set(&mut v, u32::from(cmd.op_mod()));
    cmd.encode(&mut v);
    v
}

/// Checks the status of an output and decodes it.
pub fn check_output<C: Command>(cmd: &C, out: &[u8]) -> Result<C::Reply, CmdError> {
    let status = CmdStatus::from_u8(OUT_STATUS.get(out) as u8);
    if status != CmdStatus::Ok {
        return Err(CmdError::Failed {
            opcode: cmd.opcode(),
            op_mod: cmd.op_mod(),
            status,
            syndrome: OUT_SYNDROME.get(out),
        });
    }
    cmd.decode(out)
}

/// Declares a command with no body fields beyond an optional 24-bit object
/// number at 0x08 and no reply beyond the status.
macro_rules! simple_command {
    ($(#[$m:meta])* $name:ident, $op:expr, $inlen:expr, $outlen:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name;
        impl Command for $name {
            const OPCODE: Opcode = $op;
            type Reply = ();
            fn inlen(&self) -> usize { $inlen }
            fn outlen(&self) -> usize { $outlen }
            fn encode(&self, _inbox: &mut [u8]) {}
            fn decode(&self, _outbox: &[u8]) -> Result<(), CmdError> { Ok(()) }
        }
    };
}
pub(crate) use simple_command;

/// Declares a command whose input is one object number at 0x08 and whose
/// output is only the status: the destroy, release and state-reset commands.
macro_rules! object_command {
    ($(#[$m:meta])* $name:ident($ty:ty), $op:expr, $field:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(pub $ty);
        impl Command for $name {
            const OPCODE: Opcode = $op;
            type Reply = ();
            fn inlen(&self) -> usize {
                0x10
            }
            fn outlen(&self) -> usize {
                0x10
            }
            fn encode(&self, i: &mut [u8]) {
                $field.set(i, u32::from(self.0));
            }
            fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
                Ok(())
            }
        }
    };
}
pub(crate) use object_command;
