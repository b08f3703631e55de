//! Struct offsets and tracepoint signatures from the running kernel's BTF.
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

use agent_common::tcp::TcpOffsets;

/// Where the kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

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

/// The offsets the TCP programs read, from `btf`. `rtt_per_peer` and the
/// ephemeral port range are passed through to the programs.
pub fn tcp_offsets(
    btf: &KernelBtf,
    rtt_per_peer: bool,
    ephemeral: (u32, u32),
    tick_ns: u64,
    tracked_slots: u32,
) -> Result<TcpOffsets, BtfError> {
    let cb = btf.member("sk_buff", "cb")?.offset;
    let gso = btf.member_sized("tcp_skb_cb", "tcp_gso_segs", 2)?;
    Ok(TcpOffsets {
        valid: 1,
        sk_family: btf.member_sized("sock", "__sk_common.skc_family", 2)?,
        sk_state: btf.member_sized("sock", "__sk_common.skc_state", 1)?,
        sk_protocol: btf.member_sized("sock", "sk_protocol", 2)?,
        sk_daddr: btf.member_sized("sock", "__sk_common.skc_daddr", 4)?,
        sk_v6_daddr: btf.member_sized("sock", "__sk_common.skc_v6_daddr", 16)?,
        sk_dport: btf.member_sized("sock", "__sk_common.skc_dport", 2)?,
        sk_num: btf.member_sized("sock", "__sk_common.skc_num", 2)?,
        sk_err: btf.member_sized("sock", "sk_err", 4)?,
        tcp_srtt_us: btf.member_sized("tcp_sock", "srtt_us", 4)?,
        skb_gso_segs: cb + gso,
        // (sk, skb, err) since the tracepoint fires on failures too (6.x,
        // "tcp: add the err argument to tcp_retransmit_skb"); (sk, skb) before.
        retrans_has_err: u32::from(btf.tracepoint_args("tcp_retransmit_skb")? >= 3),
        rtt_per_peer: u32::from(rtt_per_peer),
        ephemeral_lo: ephemeral.0,
        ephemeral_hi: ephemeral.1,
        rtt_interval_jiffies: agent_common::tcp::rtt_interval_jiffies(tick_ns),
        tcp_total_retrans: btf.member_sized("tcp_sock", "total_retrans", 4)?,
        tcp_bytes_sent: btf.member_sized("tcp_sock", "bytes_sent", 8)?,
        tcp_bytes_retrans: btf.member_sized("tcp_sock", "bytes_retrans", 8)?,
        tcp_bytes_received: btf.member_sized("tcp_sock", "bytes_received", 8)?,
        sk_flags: sk_flags_offset(btf)?,
        socket_sk: btf.member_sized("socket", "sk", 8)?,
        tracked_mask: tracked_slots.saturating_sub(1),
        tcp_mstamp: btf.member_sized("tcp_sock", "tcp_mstamp", 8)?,
    })
}

/// `sock.sk_flags` (`unsigned long`): a member of `sock_common` named
/// `skc_flags` on recent kernels (`sk_flags` is a #define there), a plain
/// member of `sock` before.
fn sk_flags_offset(btf: &KernelBtf) -> Result<u32, BtfError> {
    btf.member_sized("sock", "__sk_common.skc_flags", 8)
        .or_else(|_| btf.member_sized("sock", "sk_flags", 8))
}

/// The kernel's tick (one jiffy) in ns: the resolution of the coarse
/// clocks, which advance once per tick (`1e9 / CONFIG_HZ`). 4 ms (HZ=250,
/// the common default) if the kernel does not say.
pub fn tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec into a valid pointer.
    let r = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let ns = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    if r == 0 && ns > 0 {
        ns
    } else {
        4_000_000
    }
}

/// Where `sched_switch` reads the kernel's run-queue stamps:
/// `task_struct.sched_info.{last_queued,last_arrival}`, which exist with
/// `CONFIG_SCHED_INFO`. An error names what is missing; the programs then
/// time wake-ups themselves.
pub fn sched_offsets(btf: &KernelBtf) -> Result<agent_common::sched::SchedOffsets, BtfError> {
    Ok(agent_common::sched::SchedOffsets {
        valid: 1,
        last_queued: btf.member_sized("task_struct", "sched_info.last_queued", 8)?,
        last_arrival: btf.member_sized("task_struct", "sched_info.last_arrival", 8)?,
        _pad: 0,
    })
}

/// `net.ipv4.ip_local_port_range` of the agent's namespace, or Linux's
/// default (32768..=60999) when unreadable.
pub fn ephemeral_range(proc_root: &std::path::Path) -> (u32, u32) {
    std::fs::read_to_string(proc_root.join("sys/net/ipv4/ip_local_port_range"))
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or((32768, 60999))
}

/// Parses `ip_local_port_range` (`"32768\t60999\n"`).
pub fn parse_port_range(text: &str) -> Option<(u32, u32)> {
    let mut it = text.split_ascii_whitespace().map(str::parse::<u32>);
    let lo = it.next()?.ok()?;
    let hi = it.next()?.ok()?;
    (lo <= hi && hi <= 65535 && it.next().is_none()).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob type by type.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn head(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, sz: u32) -> u32 {
            let n = self.s(name);
            let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
            for v in [n, info, sz] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.head(name, KIND_INT, 0, false, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }
        fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.head(name, KIND_TYPEDEF, 0, false, to)
        }
        fn ptr(&mut self, to: u32) -> u32 {
            self.head("", KIND_PTR, 0, false, to)
        }
        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            let id = self.head("", KIND_ARRAY, 0, false, 0);
            for v in [elem, index, n] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            id
        }
        /// Members: (name, type, bit offset, bitfield bits).
        fn composite(
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
        fn func_proto(&mut self, params: &[u32]) -> u32 {
            let id = self.head("", KIND_FUNC_PROTO, params.len() as u32, false, 0);
            for p in params {
                self.types.extend_from_slice(&0u32.to_le_bytes());
                self.types.extend_from_slice(&p.to_le_bytes());
            }
            id
        }
        fn build(&self) -> Vec<u8> {
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
    fn sample() -> KernelBtf {
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

    /// `task_struct` as `CONFIG_SCHED_INFO` lays it out (or without it).
    fn task_btf(sched_info: bool) -> KernelBtf {
        let mut b = Builder::new();
        let u64_ = b.int("unsigned long long", 8);
        let long = b.int("long", 8);
        let info = b.composite(
            KIND_STRUCT,
            "sched_info",
            32,
            &[
                ("pcount", long, 0, 0),
                ("run_delay", u64_, 64, 0),
                ("last_arrival", u64_, 128, 0),
                ("last_queued", u64_, 192, 0),
            ],
        );
        let mut members = vec![("__state", long, 0, 0)];
        if sched_info {
            members.push(("sched_info", info, 1024, 0));
        }
        b.composite(KIND_STRUCT, "task_struct", 256, &members);
        KernelBtf::parse(b.build(), "task").expect("task BTF parses")
    }

    #[test]
    fn sched_offsets_need_sched_info() {
        let got = sched_offsets(&task_btf(true)).unwrap();
        assert_eq!(
            (got.valid, got.last_arrival, got.last_queued),
            (1, 128 + 16, 128 + 24)
        );
        let e = sched_offsets(&task_btf(false)).unwrap_err().to_string();
        assert!(e.contains("sched_info.last_queued"), "{e}");
    }

    /// `sk_flags` where 6.x keeps it (`sock_common.skc_flags`) and where
    /// older kernels did (`sock.sk_flags`).
    #[test]
    fn sk_flags_old_and_new() {
        for (case, in_common, want) in [("6.x", true, 8), ("before", false, 16)] {
            let mut b = Builder::new();
            let ulong = b.int("unsigned long", 8);
            let common_members: &[(&str, u32, u32, u32)] = if in_common {
                &[("skc_flags", ulong, 64, 0)]
            } else {
                &[]
            };
            let common = b.composite(KIND_STRUCT, "sock_common", 16, common_members);
            let mut members = vec![("__sk_common", common, 0, 0)];
            if !in_common {
                members.push(("sk_flags", ulong, 128, 0));
            }
            b.composite(KIND_STRUCT, "sock", 24, &members);
            let btf = KernelBtf::parse(b.build(), case).expect("parses");
            assert_eq!(sk_flags_offset(&btf).unwrap(), want, "{case}");
        }
        let e = sk_flags_offset(&sample()).unwrap_err().to_string();
        assert!(
            e.contains("sk_flags"),
            "the 4-byte bitfield of sample(): {e}"
        );
    }

    #[test]
    fn port_ranges() {
        let cases = [
            ("32768\t60999\n", Some((32768, 60999))),
            ("1024 65535", Some((1024, 65535))),
            ("60999 32768", None),
            ("1 70000", None),
            ("32768", None),
            ("a b", None),
            ("1 2 3", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_port_range(text), want, "{text:?}");
        }
    }
}
