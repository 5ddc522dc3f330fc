//! Re-packing a tar stream from a sandbox as a zip, on the host, in memory only.
//!
//! The tar stream is hostile (the sandbox's own `tar`, or anything that replaced it, wrote
//! it), so: nothing is ever written to a host path or resolved against one; every read is
//! bounded ([`MAX_TOTAL_BYTES`] of contents, [`MAX_ENTRIES`] entries, long names and PAX
//! records at most [`MAX_META_BYTES`], read by this module rather than buffered whole by the
//! `tar` crate); member names must be relative, without `..`, NUL or empty components
//! (anything else fails the archive: decoding fails closed). Regular files, directories and
//! symbolic links (stored as links, never followed) are kept; hard links, devices and FIFOs
//! are skipped.

use std::io::{Read, Write};

use zip::CompressionMethod;
use zip::write::{SimpleFileOptions, ZipWriter};

/// Most bytes of file contents in one archive.
pub const MAX_TOTAL_BYTES: u64 = 2 << 30;
/// Most entries in one archive.
pub const MAX_ENTRIES: usize = 200_000;
/// Longest GNU long name or PAX header.
pub const MAX_META_BYTES: u64 = 64 * 1024;

/// Why an archive could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("reading the tar stream")]
    Tar(#[source] std::io::Error),
    #[error("writing the zip")]
    Zip(#[source] zip::result::ZipError),
    #[error("unsafe member name {0:?}")]
    BadName(String),
    #[error("the archive exceeds {0}")]
    TooLarge(&'static str),
}

/// Read a tar stream from `input` and write it to `output` as a zip.
pub fn tar_to_zip(input: impl Read, output: impl Write) -> Result<(), ZipError> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(ZipError::Tar)?.raw(true);
    let mut zip = ZipWriter::new_stream(output);
    // No zip64: the caps keep every size and offset under 4 GiB, and some readers (fflate,
    // which the CodeSandbox SDK ships) misread zip64 entries written as a stream.
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    let mut total = 0u64;
    let mut count = 0usize;
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(ZipError::Tar)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(ZipError::TooLarge("the entry limit"));
        }
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname() {
            long_name = Some(read_meta(&mut entry)?);
            continue;
        }
        if kind.is_gnu_longlink() {
            long_link = Some(read_meta(&mut entry)?);
            continue;
        }
        if kind.is_pax_local_extensions() {
            let pax = read_meta(&mut entry)?;
            for (key, value) in pax_records(&pax) {
                match key {
                    b"path" => long_name = Some(value.to_vec()),
                    b"linkpath" => long_link = Some(value.to_vec()),
                    _ => {}
                }
            }
            continue;
        }
        if kind.is_pax_global_extensions() {
            read_meta(&mut entry)?;
            continue;
        }
        let raw_name = long_name
            .take()
            .unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let raw_link = long_link
            .take()
            .or_else(|| entry.header().link_name_bytes().map(|b| b.into_owned()));
        let name = member_name(&raw_name)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let o = opts.unix_permissions(mode);
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let size = entry.header().size().map_err(ZipError::Tar)?;
            total = total.saturating_add(size);
            if total > MAX_TOTAL_BYTES {
                return Err(ZipError::TooLarge("the size limit"));
            }
            zip.start_file(name, o).map_err(ZipError::Zip)?;
            // `entry` reads at most the header's size.
            std::io::copy(&mut entry, &mut zip).map_err(ZipError::Tar)?;
        } else if kind.is_dir() {
            zip.add_directory(name, o).map_err(ZipError::Zip)?;
        } else if kind.is_symlink() {
            let target = raw_link.unwrap_or_default();
            if target.is_empty() || target.len() > 4096 || target.contains(&0) {
                continue;
            }
            let target = String::from_utf8_lossy(&target).into_owned();
            zip.add_symlink(name, target, o).map_err(ZipError::Zip)?;
        }
        // Hard links, devices, FIFOs: skipped.
    }
    let mut out = zip.finish().map_err(ZipError::Zip)?;
    out.flush().map_err(ZipError::Tar)?;
    Ok(())
}

/// Read a long name or PAX entry, at most [`MAX_META_BYTES`].
fn read_meta(entry: &mut impl Read) -> Result<Vec<u8>, ZipError> {
    let mut buf = Vec::new();
    entry
        .take(MAX_META_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(ZipError::Tar)?;
    if buf.len() as u64 > MAX_META_BYTES {
        return Err(ZipError::TooLarge("the metadata limit"));
    }
    while buf.last() == Some(&0) {
        buf.pop();
    }
    Ok(buf)
}

/// The `key=value` records of a PAX header (`<len> <key>=<value>\n` each); a malformed
/// record ends the list.
fn pax_records(data: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > rest.len() {
            break;
        }
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|&b| b == b'=') {
            out.push((&record[..eq], &record[eq + 1..]));
        }
        rest = &rest[len..];
    }
    out
}

/// A safe zip member name: UTF-8, relative, no `..`, NUL or backslash, `.` components and
/// repeated slashes dropped. Fails on anything else.
pub fn member_name(raw: &[u8]) -> Result<String, ZipError> {
    let bad = || ZipError::BadName(String::from_utf8_lossy(raw).into_owned());
    let s = std::str::from_utf8(raw).map_err(|_| bad())?;
    if s.starts_with('/') || s.contains('\0') || s.contains('\\') || s.len() > 4096 {
        return Err(bad());
    }
    let mut parts = Vec::new();
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad()),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    #[test]
    fn files_dirs_and_links_are_kept_and_never_followed() {
        let long = format!("site/{}/deep.txt", "d".repeat(150));
        let data = tar_of(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0), "site/", &[][..])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 5),
                "site/a.txt",
                &b"hello"[..],
            )
            .unwrap();
            b.append_data(&mut header(tar::EntryType::Regular, 2), &long, &b"hi"[..])
                .unwrap();
            let mut h = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "site/passwd", "/etc/passwd").unwrap();
        });
        let mut out = Vec::new();
        tar_to_zip(&data[..], &mut out).unwrap();
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(out)).unwrap();
        let mut s = String::new();
        z.by_name("site/a.txt")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        s.clear();
        z.by_name(&long).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hi");
        let mut link = z.by_name("site/passwd").unwrap();
        assert!(link.is_symlink());
        s.clear();
        link.read_to_string(&mut s).unwrap();
        assert_eq!(s, "/etc/passwd");
    }

    #[test]
    fn unsafe_names_fail_the_archive() {
        for bad in ["/etc/passwd", "a/../../x", "..", "a\\b", "./", ""] {
            assert!(member_name(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(member_name(b"./a//b/").unwrap(), "a/b");
        assert!(member_name(b"a\xffb").is_err());
        // A hostile stream that names a member outside the tree (GNU long name) fails.
        let mut handmade = Vec::new();
        let name = format!("../{}", "x".repeat(200));
        let mut h = header(tar::EntryType::GNULongName, name.len() as u64 + 1);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        handmade.extend_from_slice(h.as_bytes());
        let mut padded = name.into_bytes();
        padded.push(0);
        padded.resize(512, 0);
        handmade.extend_from_slice(&padded);
        let mut h = header(tar::EntryType::Regular, 0);
        h.set_path("x").unwrap();
        h.set_cksum();
        handmade.extend_from_slice(h.as_bytes());
        handmade.extend_from_slice(&[0u8; 1024]);
        assert!(matches!(
            tar_to_zip(&handmade[..], Vec::new()),
            Err(ZipError::BadName(_))
        ));
        // An oversized long name is refused before it is buffered.
        let mut huge = Vec::new();
        let mut h = header(tar::EntryType::GNULongName, 10 << 20);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        huge.extend_from_slice(h.as_bytes());
        huge.extend(std::iter::repeat_n(b'a', 10 << 20));
        assert!(matches!(
            tar_to_zip(&huge[..], Vec::new()),
            Err(ZipError::TooLarge(_))
        ));
    }

    #[test]
    fn pax_records_parse() {
        let rec = b"20 path=a/long/name\n15 linkpath=/x\n";
        let r = pax_records(rec);
        assert_eq!(
            r,
            vec![
                (&b"path"[..], &b"a/long/name"[..]),
                (&b"linkpath"[..], &b"/x"[..])
            ]
        );
        assert!(pax_records(b"999 path=x\n").is_empty());
    }
}
