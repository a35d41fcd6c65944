//! Read-only typed memory maps of cache files. This module holds the crate's only `unsafe`.
//!
//! # When mapping is sound
//!
//! A map is sound only while no one truncates or rewrites the file in place: a change would
//! alter memory Rust treats as immutable, and a truncation raises SIGBUS. Cache files satisfy
//! this by construction: [`crate::data::ShardSet::open`] writes them into a temporary
//! directory, fsyncs them, and renames the whole directory into place; a published cache
//! directory is never opened for writing again (a rebuild uses a fresh directory, and deleting
//! a mapped file keeps the old inode's bytes alive). Do not edit files under `.kd-cache/` by
//! hand while a loader runs.
//!
//! # Reinterpreting the bytes
//!
//! The files hold plain native-endian `u8`/`u32`/`u64`/`f32` arrays (the cache header records
//! the endianness and a cache is rebuilt on a machine that differs). Every bit pattern is a
//! valid value of those types, the map's base is page-aligned (checked anyway), and the length
//! is checked to be a multiple of the element size when the file is mapped.

use std::fs::File;
use std::marker::PhantomData;
use std::path::Path;

use memmap2::Mmap;

use super::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
}

/// Element types for which every bit pattern is a valid value.
pub(crate) trait Plain: sealed::Sealed + Copy + 'static {}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(u8, u32, u64, f32);

/// A file mapped read-only and viewed as `[T]`.
pub(crate) struct Mapped<T: Plain> {
    map: Option<Mmap>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> std::fmt::Debug for Mapped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

impl<T: Plain> Mapped<T> {
    /// Maps `path`, which must hold exactly `expect_len` elements of `T`.
    pub(crate) fn open(path: &Path, expect_len: usize) -> Result<Mapped<T>> {
        let size = std::mem::size_of::<T>();
        let bad = |what: String| Error::Cache {
            path: path.to_path_buf(),
            what,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let bytes = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let want = (expect_len as u64) * size as u64;
        if bytes != want {
            return Err(bad(format!(
                "{bytes} bytes, expected {expect_len} elements of {size} bytes = {want}"
            )));
        }
        if expect_len == 0 {
            return Ok(Mapped {
                map: None,
                len: 0,
                _t: PhantomData,
            });
        }
        // SAFETY: see the module documentation: published cache files are never modified or
        // truncated in place, so the mapped bytes stay valid and unchanged for the map's life.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if map.len() != want as usize || map.as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
            return Err(bad("mapping has the wrong size or alignment".into()));
        }
        Ok(Mapped {
            map: Some(map),
            len: expect_len,
            _t: PhantomData,
        })
    }

    /// The whole file as a slice; zero-copy.
    #[inline]
    pub(crate) fn as_slice(&self) -> &[T] {
        match &self.map {
            None => &[],
            // SAFETY: `open` checked that the map is aligned for `T` and holds exactly `len`
            // elements; `T: Plain` admits every bit pattern; the bytes are immutable for the
            // map's lifetime (module documentation), which bounds the returned borrow.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<T>(), self.len) },
        }
    }
}
