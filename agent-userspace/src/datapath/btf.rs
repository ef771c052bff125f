//! Member offsets of a kernel struct, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`), so
//! the programs find fields of kernel-private structs where this kernel put them.
//!
//! Written here because it is one lookup: aya-obj parses BTF but keeps its type accessors
//! private, and btf-rs is LGPL (agentwall is MIT OR Apache-2.0).

use std::path::Path;

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("not BTF data (bad magic or header)")]
    Header,
    #[error("BTF type {0} is truncated or of an unknown kind {1}")]
    Type(u32, u32),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
}

/// Byte offsets of `members` in `struct name`, in the order asked.
pub fn member_offsets(data: &[u8], name: &str, members: &[&str]) -> Result<Vec<u32>, BtfError> {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u16_at(0) != Some(MAGIC) {
        return Err(BtfError::Header);
    }
    let field = |i: usize| {
        u32_at(4 + 4 * i)
            .map(|v| v as usize)
            .ok_or(BtfError::Header)
    };
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    if data.len() < types + type_len || data.len() < strings + str_len {
        return Err(BtfError::Header);
    }
    let string = |off: u32| -> &[u8] {
        let s = &data[strings + off as usize..strings + str_len];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    };
    let mut p = types;
    let mut id = 1u32;
    while p < types + type_len {
        let (Some(name_off), Some(info)) = (u32_at(p), u32_at(p + 4)) else {
            return Err(BtfError::Type(id, 0));
        };
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 != 0;
        let extra = match kind {
            1 | 14 | 17 => 4,     // int, var, decl_tag
            3 => 12,              // array
            4 | 5 => 12 * vlen,   // struct, union
            6 | 13 => 8 * vlen,   // enum, func_proto
            15 | 19 => 12 * vlen, // datasec, enum64
            2 | 7..=12 | 16 | 18 => 0,
            k => return Err(BtfError::Type(id, k)),
        };
        let body = p + 12;
        if kind == KIND_STRUCT && string(name_off) == name.as_bytes() {
            return members
                .iter()
                .map(|m| {
                    (0..vlen)
                        .find_map(|i| {
                            let at = body + 12 * i;
                            let mname = u32_at(at)?;
                            let off = u32_at(at + 8)?;
                            let bits = if kind_flag { off & 0xff_ffff } else { off };
                            (string(mname) == m.as_bytes()).then_some(bits / 8)
                        })
                        .ok_or_else(|| BtfError::NoMember(name.into(), (*m).into()))
                })
                .collect();
        }
        p = body + extra;
        id += 1;
    }
    Err(BtfError::NoStruct(name.into()))
}

/// `member_offsets` on the running kernel's BTF.
pub fn kernel_member_offsets(name: &str, members: &[&str]) -> Result<Vec<u32>, BtfError> {
    let data = std::fs::read(Path::new(VMLINUX))
        .map_err(|e| BtfError::Read(VMLINUX.into(), e.to_string()))?;
    member_offsets(&data, name, members)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with an int and `struct s { int a; int b; }` (b at byte 4), plus whatever
    /// extra types come first.
    fn blob(prefix_types: &[u8], kind_flag: bool) -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0";
        let mut types = prefix_types.to_vec();
        let w = |t: &mut Vec<u8>, v: u32| t.extend_from_slice(&v.to_le_bytes());
        // int: name "int", kind 1, size 4, encoding word
        w(&mut types, 1);
        w(&mut types, 1 << 24);
        w(&mut types, 4);
        w(&mut types, 32);
        // struct s: two members
        w(&mut types, 5);
        w(
            &mut types,
            (4 << 24) | 2 | if kind_flag { 1 << 31 } else { 0 },
        );
        w(&mut types, 8);
        for (name, bits) in [(7u32, 0u32), (9, 32)] {
            w(&mut types, name);
            w(&mut types, 1);
            w(&mut types, bits);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_member_byte_offsets() {
        assert_eq!(
            member_offsets(&blob(&[], false), "s", &["b", "a"]),
            Ok(vec![4, 0])
        );
        assert_eq!(member_offsets(&blob(&[], true), "s", &["b"]), Ok(vec![4]));
    }

    #[test]
    fn skips_types_before_the_struct() {
        // A pointer (kind 2, no trailing data) before the int.
        let ptr = [0u8, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0];
        assert_eq!(member_offsets(&blob(&ptr, false), "s", &["b"]), Ok(vec![4]));
    }

    #[test]
    fn says_what_is_missing() {
        let b = blob(&[], false);
        assert_eq!(
            member_offsets(&b, "t", &["a"]),
            Err(BtfError::NoStruct("t".into()))
        );
        assert_eq!(
            member_offsets(&b, "s", &["c"]),
            Err(BtfError::NoMember("s".into(), "c".into()))
        );
        assert_eq!(member_offsets(b"nope", "s", &["a"]), Err(BtfError::Header));
    }
}
