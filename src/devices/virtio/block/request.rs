//! One virtio-blk request as the guest framed it (virtio 1.2, 5.2.6), checked: a pure
//! function of the chain's descriptors, the header's bytes and the disk's geometry.
//!
//! The framing ebb takes is Linux's and Firecracker's: the 16-byte header alone in the first
//! descriptor (device-readable), the data in the descriptors between, the status byte in the
//! last (device-writable). Anything else is refused with a reason, never guessed at.

use super::{
    req_status, req_type, HEADER_BYTES, MAX_REQUEST_BYTES, SECTOR_BYTES, SEG_MAX, SIZE_MAX,
};

pub use crate::devices::virtio::Desc;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read sectors into the data descriptors.
    Read,
    /// Write the data descriptors' bytes to sectors.
    Write,
    /// Make written data durable.
    Flush,
    /// Write the device ID into the data descriptors.
    GetId,
}

/// A checked request: its data lies within the disk and its descriptors go the right way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub kind: Kind,
    /// Byte offset on the disk (0 for flush and get-id).
    pub offset: u64,
    /// The data descriptors, in order.
    pub data: Vec<Desc>,
    /// Their bytes, all together (at most `MAX_REQUEST_BYTES`).
    pub data_bytes: u32,
    /// Where the status byte goes.
    pub status: Desc,
}

/// The disk as requests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes are refused.
    pub read_only: bool,
}

/// Why a chain was refused; each kind has its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The chain's framing is wrong: too short, no writable status descriptor, a header that
    /// is write-only, short or outside guest RAM, too many or too long data descriptors.
    Framing(&'static str),
    /// A data descriptor goes the wrong way for the request type.
    Direction,
    /// Read or write data that is not whole sectors.
    Unaligned(u32),
    /// Sectors past the end of the disk (or a sector number that overflows).
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors asked for.
        sectors: u64,
    },
    /// A write to a read-only disk.
    ReadOnly,
    /// A request type ebb does not implement.
    Unsupported(u32),
}

/// A refused chain: why, and where its status goes (None when it has no usable status
/// descriptor: the chain is returned with nothing written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub fault: Fault,
    /// The status descriptor, if the chain has a usable one.
    pub status: Option<Desc>,
}

impl Refused {
    /// The status byte the guest gets: `UNSUPP` for an unknown type, `IOERR` for the rest
    /// (a write to a read-only disk included, as 5.2.6.2 asks).
    pub fn status_byte(&self) -> u8 {
        match self.fault {
            Fault::Unsupported(_) => req_status::UNSUPP,
            _ => req_status::IOERR,
        }
    }
}

/// Checks a chain. `header` is the first descriptor's first 16 bytes, None if they could not
/// be read from guest memory.
///
/// # Errors
/// [`Refused`] with the first fault found.
pub fn parse(
    descs: &[Desc],
    header: Option<[u8; 16]>,
    geometry: Geometry,
) -> Result<Request, Refused> {
    let (Some(first), Some(&status)) = (descs.first(), descs.last()) else {
        return Err(Refused { fault: Fault::Framing("empty chain"), status: None });
    };
    if descs.len() < 2 || !status.write_only || status.len == 0 {
        let fault = Fault::Framing("no device-writable status descriptor at the end");
        return Err(Refused { fault, status: None });
    }
    let refuse = |fault| Refused { fault, status: Some(status) };
    let header = match header {
        Some(h) if !first.write_only && first.len >= HEADER_BYTES => h,
        _ => return Err(refuse(Fault::Framing("header not a readable 16-byte descriptor"))),
    };
    let data = &descs[1..descs.len() - 1];
    let data_bytes = check_segments(data).map_err(refuse)?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector);
    let (kind, offset) = match req_type {
        req_type::IN | req_type::OUT => {
            let write = req_type == req_type::OUT;
            if write && geometry.read_only {
                return Err(refuse(Fault::ReadOnly));
            }
            check_direction(data, !write).map_err(refuse)?;
            let offset = check_range(sector, data_bytes, geometry).map_err(refuse)?;
            (if write { Kind::Write } else { Kind::Read }, offset)
        }
        req_type::FLUSH if data.is_empty() => (Kind::Flush, 0),
        req_type::FLUSH => return Err(refuse(Fault::Direction)),
        req_type::GET_ID if !data.is_empty() => {
            check_direction(data, true).map_err(refuse)?;
            (Kind::GetId, 0)
        }
        req_type::GET_ID => return Err(refuse(Fault::Direction)),
        other => return Err(refuse(Fault::Unsupported(other))),
    };
    Ok(Request { kind, offset, data: data.to_vec(), data_bytes, status })
}

/// The data descriptors' total length, if there are at most `SEG_MAX` of at most `SIZE_MAX`
/// bytes each.
fn check_segments(data: &[Desc]) -> Result<u32, Fault> {
    if data.len() > SEG_MAX as usize {
        return Err(Fault::Framing("more data descriptors than seg_max"));
    }
    if data.iter().any(|d| d.len > SIZE_MAX) {
        return Err(Fault::Framing("a data descriptor longer than size_max"));
    }
    // At most 64 descriptors of at most 64 KiB: the sum fits in u32.
    let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    match u32::try_from(total) {
        Ok(t) if t <= MAX_REQUEST_BYTES => Ok(t),
        _ => Err(Fault::Framing("more data than one request may carry")),
    }
}

fn check_direction(data: &[Desc], device_writes: bool) -> Result<(), Fault> {
    match data.iter().all(|d| d.write_only == device_writes) {
        true => Ok(()),
        false => Err(Fault::Direction),
    }
}

/// The byte offset of `sector`, if `data_bytes` whole sectors from it lie within the disk.
fn check_range(sector: u64, data_bytes: u32, geometry: Geometry) -> Result<u64, Fault> {
    if u64::from(data_bytes) % SECTOR_BYTES != 0 {
        return Err(Fault::Unaligned(data_bytes));
    }
    let sectors = u64::from(data_bytes) / SECTOR_BYTES;
    match sector.checked_add(sectors) {
        // sector <= capacity, and capacity * 512 is the image's size: no overflow.
        Some(end) if end <= geometry.capacity_sectors => Ok(sector * SECTOR_BYTES),
        _ => Err(Fault::OutOfRange { sector, sectors }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry { capacity_sectors: 2048, read_only: false };

    fn header(t: u32, sector: u64) -> Option<[u8; 16]> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        Some(h)
    }

    fn d(len: u32, write_only: bool) -> Desc {
        Desc { addr: 0x1000, len, write_only }
    }

    fn chain(data: &[Desc]) -> Vec<Desc> {
        let mut v = vec![d(16, false)];
        v.extend_from_slice(data);
        v.push(d(1, true));
        v
    }

    #[test]
    fn a_linux_read_parses_with_its_offset_and_data() {
        let descs = chain(&[d(4096, true)]);
        let r = parse(&descs, header(req_type::IN, 8), GEO).unwrap();
        assert_eq!((r.kind, r.offset, r.data_bytes), (Kind::Read, 4096, 4096));
        assert_eq!(r.status, d(1, true));
    }

    #[test]
    fn the_last_sectors_are_in_range_and_one_more_is_not() {
        let descs = chain(&[d(1024, true)]);
        assert!(parse(&descs, header(req_type::IN, 2046), GEO).is_ok());
        let e = parse(&descs, header(req_type::IN, 2047), GEO).unwrap_err();
        assert_eq!(e.fault, Fault::OutOfRange { sector: 2047, sectors: 2 });
        let e = parse(&descs, header(req_type::IN, u64::MAX), GEO).unwrap_err();
        assert!(matches!(e.fault, Fault::OutOfRange { .. }), "sector + len overflows");
        assert_eq!(e.status_byte(), req_status::IOERR);
    }

    #[test]
    fn data_going_the_wrong_way_is_refused() {
        let read_into_readable = chain(&[d(512, false)]);
        let e = parse(&read_into_readable, header(req_type::IN, 0), GEO).unwrap_err();
        assert_eq!(e.fault, Fault::Direction);
        let write_from_writable = chain(&[d(512, false), d(512, true)]);
        let e = parse(&write_from_writable, header(req_type::OUT, 0), GEO).unwrap_err();
        assert_eq!(e.fault, Fault::Direction);
        let flush_with_data = chain(&[d(512, true)]);
        assert!(parse(&flush_with_data, header(req_type::FLUSH, 0), GEO).is_err());
    }

    #[test]
    fn writes_to_a_read_only_disk_get_ioerr() {
        let ro = Geometry { read_only: true, ..GEO };
        let e = parse(&chain(&[d(512, false)]), header(req_type::OUT, 0), ro).unwrap_err();
        assert_eq!((e.fault, e.status_byte()), (Fault::ReadOnly, req_status::IOERR));
        assert!(parse(&chain(&[d(512, true)]), header(req_type::IN, 0), ro).is_ok());
    }

    #[test]
    fn unknown_types_get_unsupp() {
        let e = parse(&chain(&[]), header(11, 0), GEO).unwrap_err();
        assert_eq!((e.fault, e.status_byte()), (Fault::Unsupported(11), req_status::UNSUPP));
    }

    #[test]
    fn framing_faults_say_whether_a_status_can_be_written() {
        let no_status = [d(16, false), d(512, true), d(1, false)];
        assert_eq!(parse(&no_status, header(0, 0), GEO).unwrap_err().status, None);
        assert_eq!(parse(&[d(1, true)], header(0, 0), GEO).unwrap_err().status, None);
        assert_eq!(parse(&[], None, GEO).unwrap_err().status, None);
        let short_header = [d(8, false), d(512, true), d(1, true)];
        let e = parse(&short_header, header(0, 0), GEO).unwrap_err();
        assert!(matches!(e.fault, Fault::Framing(_)));
        assert_eq!(e.status, Some(d(1, true)));
        let unreadable_header = chain(&[d(512, true)]);
        assert!(parse(&unreadable_header, None, GEO).is_err());
    }

    #[test]
    fn data_is_bounded_by_seg_max_and_size_max_and_whole_sectors() {
        let many = vec![d(512, true); SEG_MAX as usize + 1];
        assert!(matches!(
            parse(&chain(&many), header(0, 0), GEO).unwrap_err().fault,
            Fault::Framing(_)
        ));
        let long = [d(SIZE_MAX + 512, true)];
        assert!(parse(&chain(&long), header(0, 0), GEO).is_err());
        let odd = [d(513, true)];
        assert_eq!(
            parse(&chain(&odd), header(0, 0), GEO).unwrap_err().fault,
            Fault::Unaligned(513)
        );
    }

    #[test]
    fn flush_and_get_id_parse() {
        assert_eq!(parse(&chain(&[]), header(req_type::FLUSH, 0), GEO).unwrap().kind, Kind::Flush);
        let id = parse(&chain(&[d(20, true)]), header(req_type::GET_ID, 0), GEO).unwrap();
        assert_eq!((id.kind, id.data_bytes), (Kind::GetId, 20));
        assert!(parse(&chain(&[]), header(req_type::GET_ID, 0), GEO).is_err());
    }
}
