//! The kernel BTF reader: struct offsets, enums and tracepoint signatures
//! from the running kernel's BTF, parsed once per start-up
//! ([`crate::families::BtfCell`]) and shared by every family.
//!
//! Rust eBPF has no CO-RE field relocations (`preserve_access_index`), so a
//! program cannot say "`sock.sk_err` wherever this kernel put it". Instead
//! userspace reads `/sys/kernel/btf/vmlinux` at start-up, finds the byte
//! offset of each field a program reads, and passes the offsets to the
//! programs as read-only globals (`EbpfLoader::set_global`). The verifier
//! sees them as constants, so a branch a kernel cannot take (a tracepoint
//! argument it lacks) is pruned before it is checked.
//!
//! `aya::Btf` parses the same data but keeps its type lookups crate-private
//! (aya-obj 0.3), hence this small reader: the BTF header, the type section
//! walked once to index every type by name, and member lookup that descends
//! into anonymous structs and unions the way C name lookup does
//! (`sock.skc_daddr` is inside two anonymous members of `sock_common`).
//! Format: `Documentation/bpf/btf.rst`, stable since 4.18 (kinds up to
//! `ENUM64`, 6.0). Little-endian hosts only, like the eBPF object.

use std::collections::HashMap;

/// Where the kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

/// Largest BTF file `probes.btf_path` may name. A distribution kernel's
/// vmlinux BTF is 5 to 10 MiB and BTFhub's files are smaller: anything past
/// 64 MiB is not a kernel's BTF.
pub const MAX_BTF_FILE_BYTES: u64 = 64 << 20;

/// Reads the BTF file `probes.btf_path` names (a BTFhub-style file, or one
/// extracted from the same kernel): a regular file of at most
/// [`MAX_BTF_FILE_BYTES`] that starts with the BTF magic. Errors name the
/// path and the cause.
pub fn read_btf_file(path: &std::path::Path) -> Result<Vec<u8>, BtfError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let unusable = |reason: String| BtfError::Unusable {
        path: shown.clone(),
        reason,
    };
    let io = |source| BtfError::Io {
        path: shown.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(unusable(format!(
            "not a regular file ({})",
            super::file_type_name(&meta.file_type())
        )));
    }
    if meta.len() > MAX_BTF_FILE_BYTES {
        return Err(unusable(format!(
            "{} bytes; a kernel's BTF is at most {MAX_BTF_FILE_BYTES} bytes (64 MiB)",
            meta.len()
        )));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BTF_FILE_BYTES + 1).read_to_end(&mut data))
        .map_err(io)?;
    if data.len() as u64 > MAX_BTF_FILE_BYTES {
        return Err(unusable(format!(
            "grew past {MAX_BTF_FILE_BYTES} bytes while read"
        )));
    }
    match data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])) {
        Some(MAGIC) => Ok(data),
        Some(m) => Err(unusable(format!(
            "not raw BTF: starts with {m:#06x}, BTF starts with {MAGIC:#06x} \
             (an ELF or compressed file must be extracted first, e.g. \
             `bpftool btf dump file vmlinux format raw` or BTFhub's .btf.tar.xz unpacked)"
        ))),
        None => Err(unusable("empty or shorter than a BTF header".to_owned())),
    }
}

pub(crate) const KIND_INT: u32 = 1;
pub(crate) const KIND_PTR: u32 = 2;
pub(crate) const KIND_ARRAY: u32 = 3;
pub(crate) const KIND_STRUCT: u32 = 4;
pub(crate) const KIND_UNION: u32 = 5;
pub(crate) const KIND_ENUM: u32 = 6;
pub(crate) const KIND_FWD: u32 = 7;
pub(crate) const KIND_TYPEDEF: u32 = 8;
pub(crate) const KIND_VOLATILE: u32 = 9;
pub(crate) const KIND_CONST: u32 = 10;
pub(crate) const KIND_RESTRICT: u32 = 11;
pub(crate) const KIND_FUNC: u32 = 12;
pub(crate) const KIND_FUNC_PROTO: u32 = 13;
pub(crate) const KIND_VAR: u32 = 14;
pub(crate) const KIND_DATASEC: u32 = 15;
pub(crate) const KIND_FLOAT: u32 = 16;
pub(crate) const KIND_DECL_TAG: u32 = 17;
pub(crate) const KIND_TYPE_TAG: u32 = 18;
pub(crate) const KIND_ENUM64: u32 = 19;

/// Errors reading BTF or finding what a program needs in it. Each names the
/// source file and the type or member at fault.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file opened.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A BTF file handed over by path that cannot be BTF.
    #[error("{path}: {reason}")]
    Unusable {
        /// The file named.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// The data is not BTF this reader understands.
    #[error("{source_name}: malformed BTF at byte {at}: {reason}")]
    Malformed {
        /// The file parsed.
        source_name: String,
        /// Byte offset in the file where parsing failed.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// No type of the wanted kind has this name.
    #[error("{source_name}: no {kind} named `{name}`")]
    NoType {
        /// The file parsed.
        source_name: String,
        /// `struct`, `typedef`, ...
        kind: &'static str,
        /// The name looked up.
        name: String,
    },
    /// The struct has no member of this name (directly or in an anonymous
    /// member).
    #[error("{source_name}: `{ty}` has no member `{member}`")]
    NoMember {
        /// The file parsed.
        source_name: String,
        /// The struct or union searched.
        ty: String,
        /// The member looked up.
        member: String,
    },
    /// The member is a bitfield or not byte-aligned: a plain load cannot
    /// read it.
    #[error("{source_name}: `{ty}.{member}` is a bitfield (bit offset {bit_offset}, {bits} bits)")]
    Bitfield {
        /// The file parsed.
        source_name: String,
        /// The struct searched.
        ty: String,
        /// The member.
        member: String,
        /// Its offset in bits.
        bit_offset: u32,
        /// Its width in bits (0 when not a declared bitfield).
        bits: u32,
    },
    /// The member's size is not what the program reads.
    #[error("{source_name}: `{ty}.{member}` is {got} bytes, the program reads {want}")]
    Size {
        /// The file parsed.
        source_name: String,
        /// The struct searched.
        ty: String,
        /// The member.
        member: String,
        /// Its size in this kernel.
        got: u32,
        /// The size the program expects.
        want: u32,
    },
}

/// A member found in a struct: where it starts and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the outermost struct searched.
    pub offset: u32,
    /// Size in bytes of the member's type.
    pub size: u32,
}

#[derive(Debug, Clone, Copy)]
struct TypeRec {
    /// Byte offset of the type record in `data`.
    at: usize,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    name_off: u32,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
}

/// A parsed BTF blob, indexed by type name.
#[derive(Debug)]
pub struct KernelBtf {
    source_name: String,
    data: Vec<u8>,
    str_start: usize,
    str_len: usize,
    /// Index 0 is `void`; type ids start at 1.
    types: Vec<TypeRec>,
    by_name: HashMap<(u32, String), u32>,
}

impl KernelBtf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(|source| BtfError::Io {
            path: VMLINUX.to_owned(),
            source,
        })?;
        Self::parse(data, VMLINUX)
    }

    /// Reads a BTF file named by path ([`read_btf_file`]).
    pub fn from_file(path: &std::path::Path) -> Result<Self, BtfError> {
        let data = read_btf_file(path)?;
        Self::parse(data, &path.display().to_string())
    }

    /// Parses a BTF blob; `source_name` names it in errors.
    pub fn parse(data: Vec<u8>, source_name: &str) -> Result<Self, BtfError> {
        let bad = |at: usize, reason: &str| BtfError::Malformed {
            source_name: source_name.to_owned(),
            at,
            reason: reason.to_owned(),
        };
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad(at, "truncated"))
        };
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| bad(0, "truncated header"))?;
        if magic != MAGIC {
            return Err(bad(
                0,
                &format!("magic {magic:#06x}, expected {MAGIC:#06x} (little-endian BTF)"),
            ));
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let type_start = hdr_len + type_off;
        let type_end = type_start + type_len;
        let str_start = hdr_len + str_off;
        if type_end > data.len() || str_start + str_len > data.len() {
            return Err(bad(4, "sections extend past the end of the data"));
        }

        let mut types = vec![TypeRec {
            at: 0,
            kind: 0,
            vlen: 0,
            kind_flag: false,
            name_off: 0,
            size_or_type: 0,
        }];
        let mut at = type_start;
        while at < type_end {
            let name_off = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let size_or_type = u32_at(at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                other => return Err(bad(at, &format!("unknown type kind {other}"))),
            };
            types.push(TypeRec {
                at,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                name_off,
                size_or_type,
            });
            at += 12 + extra;
        }
        if at != type_end {
            return Err(bad(at, "the last type runs past the type section"));
        }

        let mut btf = KernelBtf {
            source_name: source_name.to_owned(),
            data,
            str_start,
            str_len,
            types,
            by_name: HashMap::new(),
        };
        let mut by_name = HashMap::new();
        for (id, t) in btf.types.iter().enumerate().skip(1) {
            if t.name_off == 0 {
                continue;
            }
            if let Some(name) = btf.string(t.name_off) {
                // The first of a duplicated name wins, as in bpftool.
                by_name
                    .entry((t.kind, name.to_owned()))
                    .or_insert(id as u32);
            }
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    fn string(&self, off: u32) -> Option<&str> {
        let off = off as usize;
        if off >= self.str_len {
            return None;
        }
        let s = &self.data[self.str_start + off..self.str_start + self.str_len];
        let end = s.iter().position(|b| *b == 0)?;
        std::str::from_utf8(&s[..end]).ok()
    }

    fn u32_at(&self, at: usize) -> u32 {
        // In range: every record was bounds-checked by `parse`.
        let b = &self.data[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn ty(&self, id: u32) -> Option<&TypeRec> {
        self.types.get(id as usize)
    }

    fn id_of(&self, kind: u32, kind_name: &'static str, name: &str) -> Result<u32, BtfError> {
        self.by_name
            .get(&(kind, name.to_owned()))
            .copied()
            .ok_or_else(|| BtfError::NoType {
                source_name: self.source_name.clone(),
                kind: kind_name,
                name: name.to_owned(),
            })
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&TypeRec> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Size in bytes of type `id`.
    fn size_of(&self, id: u32) -> Option<u32> {
        let t = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Some(t.size_or_type)
            }
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let elem = self.u32_at(t.at + 12);
                let n = self.u32_at(t.at + 20);
                self.size_of(elem)?.checked_mul(n)
            }
            _ => None,
        }
    }

    /// Finds `member` in the struct or union `id`, descending into anonymous
    /// members. Returns (bit offset, bitfield size, type id).
    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32, u32)> {
        let t = self.resolve(id)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        let mut anonymous = Vec::new();
        for i in 0..t.vlen as usize {
            let m = t.at + 12 + 12 * i;
            let name_off = self.u32_at(m);
            let mtype = self.u32_at(m + 4);
            let raw = self.u32_at(m + 8);
            let (bit_offset, bits) = if t.kind_flag {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            if name_off == 0 {
                anonymous.push((bit_offset, mtype));
            } else if self.string(name_off) == Some(member) {
                return Some((bit_offset, bits, mtype));
            }
        }
        anonymous.into_iter().find_map(|(base, mtype)| {
            self.find_member(mtype, member, depth + 1)
                .map(|(off, bits, ty)| (base + off, bits, ty))
        })
    }

    /// The byte offset and size of `path` (`member` or `a.b.c`) in struct
    /// `ty`. Bitfields are refused: the programs do plain loads.
    pub fn member(&self, ty: &str, path: &str) -> Result<Field, BtfError> {
        let mut id = self.id_of(KIND_STRUCT, "struct", ty)?;
        let mut bit_total = 0u32;
        let no_member = |member: &str| BtfError::NoMember {
            source_name: self.source_name.clone(),
            ty: ty.to_owned(),
            member: member.to_owned(),
        };
        for part in path.split('.') {
            let (bit_offset, bits, mtype) = self
                .find_member(id, part, 0)
                .ok_or_else(|| no_member(path))?;
            bit_total += bit_offset;
            if bits != 0 || bit_total % 8 != 0 {
                return Err(BtfError::Bitfield {
                    source_name: self.source_name.clone(),
                    ty: ty.to_owned(),
                    member: path.to_owned(),
                    bit_offset: bit_total,
                    bits,
                });
            }
            id = mtype;
        }
        let size = self.size_of(id).ok_or_else(|| no_member(path))?;
        Ok(Field {
            offset: bit_total / 8,
            size,
        })
    }

    /// Like [`Self::member`], and checks the size is `want` bytes.
    pub fn member_sized(&self, ty: &str, path: &str, want: u32) -> Result<u32, BtfError> {
        let f = self.member(ty, path)?;
        if f.size != want {
            return Err(BtfError::Size {
                source_name: self.source_name.clone(),
                ty: ty.to_owned(),
                member: path.to_owned(),
                got: f.size,
                want,
            });
        }
        Ok(f.offset)
    }

    /// The enumerators of `enum name` (e.g. `skb_drop_reason`), as
    /// (name, value).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u32)>, BtfError> {
        let id = self.id_of(KIND_ENUM, "enum", name)?;
        let rec = *self.ty(id).expect("id_of returns indexed ids");
        let mut out = Vec::with_capacity(rec.vlen as usize);
        for i in 0..rec.vlen as usize {
            let e = rec.at + 12 + 8 * i;
            let n = self
                .string(self.u32_at(e))
                .ok_or_else(|| BtfError::Malformed {
                    source_name: self.source_name.clone(),
                    at: e,
                    reason: "bad enumerator name".to_owned(),
                })?;
            out.push((n.to_owned(), self.u32_at(e + 4)));
        }
        Ok(out)
    }

    /// The number of `TP_PROTO` arguments of tracepoint `name`, from the
    /// `btf_trace_<name>` typedef (a pointer to a prototype whose first
    /// parameter is the `void *` context, not counted).
    pub fn tracepoint_args(&self, name: &str) -> Result<u32, BtfError> {
        let typedef = format!("btf_trace_{name}");
        let id = self.id_of(KIND_TYPEDEF, "typedef", &typedef)?;
        let no = || BtfError::NoType {
            source_name: self.source_name.clone(),
            kind: "function prototype behind typedef",
            name: typedef.clone(),
        };
        let ptr = self.resolve(id).ok_or_else(no)?;
        if ptr.kind != KIND_PTR {
            return Err(no());
        }
        let proto = self.resolve(ptr.size_or_type).ok_or_else(no)?;
        if proto.kind != KIND_FUNC_PROTO || proto.vlen == 0 {
            return Err(no());
        }
        Ok(proto.vlen - 1)
    }
}

/// Builds BTF blobs for the tests of the families that read BTF.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// Builds a BTF blob type by type.
    #[derive(Default)]
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }
        pub(crate) fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        pub(crate) fn head(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kflag: bool,
            sz: u32,
        ) -> u32 {
            let n = self.s(name);
            let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
            for v in [n, info, sz] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.head(name, KIND_INT, 0, false, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }
        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.head(name, KIND_TYPEDEF, 0, false, to)
        }
        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.head("", KIND_PTR, 0, false, to)
        }
        pub(crate) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            let id = self.head("", KIND_ARRAY, 0, false, 0);
            for v in [elem, index, n] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            id
        }
        /// Members: (name, type, bit offset, bitfield bits).
        pub(crate) fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let kflag = members.iter().any(|m| m.3 != 0);
            let id = self.head(name, kind, members.len() as u32, kflag, size);
            for (mname, ty, off, bits) in members {
                let n = self.s(mname);
                let raw = if kflag { (bits << 24) | off } else { *off };
                for v in [n, *ty, raw] {
                    self.types.extend_from_slice(&v.to_le_bytes());
                }
            }
            id
        }
        pub(crate) fn func_proto(&mut self, params: &[u32]) -> u32 {
            let id = self.head("", KIND_FUNC_PROTO, params.len() as u32, false, 0);
            for p in params {
                self.types.extend_from_slice(&0u32.to_le_bytes());
                self.types.extend_from_slice(&p.to_le_bytes());
            }
            id
        }
        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(1);
            out.push(0);
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature `sock`: sock_common with the nesting of the real one
    /// (anonymous union of a named-less struct), a bitfield, an array.
    pub(crate) fn sample() -> KernelBtf {
        let mut b = Builder::new();
        let u16_ = b.int("unsigned short", 2);
        let u32_ = b.int("unsigned int", 4);
        let u8_ = b.int("unsigned char", 1);
        let be32 = b.typedef("__be32", u32_);
        let addrpair = b.composite(
            KIND_STRUCT,
            "",
            8,
            &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)],
        );
        let u64_ = b.int("unsigned long long", 8);
        let addr_union = b.composite(
            KIND_UNION,
            "",
            8,
            &[("skc_addrpair", u64_, 0, 0), ("", addrpair, 0, 0)],
        );
        let v6 = b.array(u8_, u32_, 16);
        let common = b.composite(
            KIND_STRUCT,
            "sock_common",
            32,
            &[
                ("", addr_union, 0, 0),
                ("skc_family", u16_, 64, 0),
                ("skc_v6_daddr", v6, 128, 0),
            ],
        );
        b.composite(
            KIND_STRUCT,
            "sock",
            48,
            &[
                ("__sk_common", common, 0, 0),
                ("sk_flags", u32_, 256, 3),
                ("sk_proto_bits", u32_, 259, 5),
                ("sk_protocol", u16_, 320, 0),
            ],
        );
        let void_ptr = b.ptr(0);
        let proto = b.func_proto(&[void_ptr, void_ptr, void_ptr, u32_]);
        let p = b.ptr(proto);
        b.typedef("btf_trace_tcp_retransmit_skb", p);
        KernelBtf::parse(b.build(), "sample").expect("sample BTF parses")
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{sample, Builder};
    use super::*;

    #[test]
    fn member_lookup_table() {
        let btf = sample();
        type Want = Result<(u32, u32), &'static str>;
        let cases: &[(&str, &str, Want)] = &[
            (
                "through anonymous union and struct",
                "__sk_common.skc_daddr",
                Ok((0, 4)),
            ),
            (
                "second member of the anonymous struct",
                "__sk_common.skc_rcv_saddr",
                Ok((4, 4)),
            ),
            (
                "plain member of a nested struct",
                "__sk_common.skc_family",
                Ok((8, 2)),
            ),
            ("array size", "__sk_common.skc_v6_daddr", Ok((16, 16))),
            ("the nested struct itself", "__sk_common", Ok((0, 32))),
            ("direct member", "sk_protocol", Ok((40, 2))),
            ("bitfield refused", "sk_proto_bits", Err("is a bitfield")),
            ("missing member", "sk_nope", Err("has no member `sk_nope`")),
            (
                "missing nested member",
                "__sk_common.skc_nope",
                Err("has no member"),
            ),
        ];
        for (case, path, want) in cases {
            match (btf.member("sock", path), want) {
                (Ok(f), Ok((off, size))) => {
                    assert_eq!((f.offset, f.size), (*off, *size), "{case}")
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{case}: {e}")
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn sizes_are_checked() {
        let btf = sample();
        assert_eq!(btf.member_sized("sock", "sk_protocol", 2).unwrap(), 40);
        let e = btf.member_sized("sock", "sk_protocol", 4).unwrap_err();
        assert!(
            e.to_string().contains("is 2 bytes, the program reads 4"),
            "{e}"
        );
        let e = btf.member("tcp_sock", "srtt_us").unwrap_err();
        assert!(e.to_string().contains("no struct named `tcp_sock`"), "{e}");
    }

    #[test]
    fn tracepoint_arg_counts() {
        let btf = sample();
        assert_eq!(btf.tracepoint_args("tcp_retransmit_skb").unwrap(), 3);
        assert!(btf.tracepoint_args("tcp_probe").is_err());
    }

    #[test]
    fn malformed_blobs_are_refused() {
        let good = {
            let mut b = Builder::new();
            b.int("int", 4);
            b.build()
        };
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        let mut bad_kind = good.clone();
        bad_kind[24 + 7] = 30; // kind byte of the first type's info
        let truncated = good[..good.len() - 3].to_vec();
        let cases = [
            ("magic", bad_magic, "magic"),
            ("unknown kind", bad_kind, "unknown type kind 30"),
            ("truncated", truncated, "past the end"),
            ("empty", Vec::new(), "truncated header"),
        ];
        for (case, data, needle) in cases {
            let e = KernelBtf::parse(data, "x").unwrap_err();
            assert!(e.to_string().contains(needle), "{case}: {e}");
        }
        assert!(KernelBtf::parse(good, "x").is_ok());
    }
}
