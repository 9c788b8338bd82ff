//! librados' and librbd's C API loaded at run time (dlopen) into one table of typed
//! function pointers, so backupfs builds and runs without Ceph; only `client` calls it.
//! It must never link against Ceph at build time, nor unload a library once loaded.

use libloading::Library;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// The sonames Debian's librados2 and librbd1 install (Ceph keeps these stable).
pub(crate) const LIBRADOS: &str = "librados.so.2";
pub(crate) const LIBRBD: &str = "librbd.so.1";
/// The Debian package that brings both libraries (librbd1 depends on librados2).
pub const PACKAGE: &str = "librbd1";

// Opaque handles, as librados.h and librbd.h declare them (`typedef void *`).
pub(crate) type RadosHandle = *mut c_void;
pub(crate) type IoctxHandle = *mut c_void;
pub(crate) type ListHandle = *mut c_void;
pub(crate) type WriteOpHandle = *mut c_void;
pub(crate) type ImageHandle = *mut c_void;
pub(crate) type OptionsHandle = *mut c_void;
pub(crate) type CompletionHandle = *mut c_void;
pub(crate) type CompletionCallback = Option<unsafe extern "C" fn(CompletionHandle, *mut c_void)>;
pub(crate) type ProgressCallback = Option<unsafe extern "C" fn(u64, u64, *mut c_void) -> c_int>;
pub(crate) type DiffCallback =
    Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>;

/// `rbd_image_info_t`.
#[repr(C)]
pub(crate) struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `rbd_image_spec_t`.
#[repr(C)]
pub(crate) struct ImageSpec {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// `rbd_snap_info_t`.
#[repr(C)]
pub(crate) struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_image_watcher_t`.
#[repr(C)]
pub(crate) struct ImageWatcher {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

// Constants from librados.h, librbd.h and rbd/features.h (Ceph 16.2; stable since).
pub(crate) const LIBRADOS_CREATE_EXCLUSIVE: c_int = 1;
pub(crate) const LIBRADOS_LOCK_FLAG_MUST_RENEW: u8 = 1 << 1;
pub(crate) const LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL: c_int = 0x8;
pub(crate) const LIBRADOS_OP_FLAG_FADVISE_NOCACHE: c_int = 0x40;
pub(crate) const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
pub(crate) const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub(crate) const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub(crate) const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "Ceph RBD needs {library} ({reason}): install the Debian package {PACKAGE} \
     (apt-get install {PACKAGE})"
)]
pub struct LoadError {
    pub library: String,
    pub reason: String,
}

/// Declares the table and its loader from one list, so a signature is written once.
/// Each entry names the library it comes from (`rados` or `rbd`).
macro_rules! api {
    ($( $lib:ident fn $name:ident($($arg:ty),* $(,)?) $(-> $ret:ty)?; )*) => {
        /// Every librados/librbd function backupfs calls, resolved once.
        pub(crate) struct Api {
            $( pub(crate) $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
            // Kept so the pointers above stay valid; never dropped (the table is static).
            _rados: Library,
            _rbd: Library,
        }

        impl Api {
            fn resolve(rados: Library, rbd: Library) -> Result<Api, LoadError> {
                Ok(Api {
                    $( $name: {
                        let (library, soname) = match stringify!($lib) {
                            "rados" => (&rados, LIBRADOS),
                            _ => (&rbd, LIBRBD),
                        };
                        // SAFETY: the symbol's type is the one librados.h/librbd.h declare
                        // for it (the list above is copied from the headers), and the
                        // pointer outlives the Library because both live in this table.
                        let symbol = unsafe {
                            library.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                        };
                        *symbol.map_err(|e| LoadError {
                            library: soname.to_string(),
                            reason: format!("no {}: {e}", stringify!($name)),
                        })?
                    }, )*
                    _rados: rados,
                    _rbd: rbd,
                })
            }
        }
    };
}

api! {
    rados fn rados_version(*mut c_int, *mut c_int, *mut c_int);
    rados fn rados_create2(*mut RadosHandle, *const c_char, *const c_char, u64) -> c_int;
    rados fn rados_conf_read_file(RadosHandle, *const c_char) -> c_int;
    rados fn rados_conf_set(RadosHandle, *const c_char, *const c_char) -> c_int;
    rados fn rados_conf_get(RadosHandle, *const c_char, *mut c_char, usize) -> c_int;
    rados fn rados_connect(RadosHandle) -> c_int;
    rados fn rados_shutdown(RadosHandle);
    rados fn rados_cluster_fsid(RadosHandle, *mut c_char, usize) -> c_int;
    rados fn rados_get_instance_id(RadosHandle) -> u64;
    rados fn rados_pool_lookup(RadosHandle, *const c_char) -> i64;
    rados fn rados_ioctx_create(RadosHandle, *const c_char, *mut IoctxHandle) -> c_int;
    rados fn rados_ioctx_destroy(IoctxHandle);
    rados fn rados_ioctx_set_namespace(IoctxHandle, *const c_char);
    rados fn rados_ioctx_get_id(IoctxHandle) -> i64;
    rados fn rados_write_full(IoctxHandle, *const c_char, *const c_char, usize) -> c_int;
    rados fn rados_read(IoctxHandle, *const c_char, *mut c_char, usize, u64) -> c_int;
    rados fn rados_remove(IoctxHandle, *const c_char) -> c_int;
    rados fn rados_stat(IoctxHandle, *const c_char, *mut u64, *mut libc::time_t) -> c_int;
    rados fn rados_nobjects_list_open(IoctxHandle, *mut ListHandle) -> c_int;
    rados fn rados_nobjects_list_next2(
        ListHandle,
        *mut *const c_char,
        *mut *const c_char,
        *mut *const c_char,
        *mut usize,
        *mut usize,
        *mut usize,
    ) -> c_int;
    rados fn rados_nobjects_list_close(ListHandle);
    rados fn rados_create_write_op() -> WriteOpHandle;
    rados fn rados_release_write_op(WriteOpHandle);
    rados fn rados_write_op_create(WriteOpHandle, c_int, *const c_char);
    rados fn rados_write_op_write_full(WriteOpHandle, *const c_char, usize);
    rados fn rados_write_op_operate(
        WriteOpHandle,
        IoctxHandle,
        *const c_char,
        *mut libc::time_t,
        c_int,
    ) -> c_int;
    rados fn rados_lock_exclusive(
        IoctxHandle,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut libc::timeval,
        u8,
    ) -> c_int;
    rados fn rados_lock_shared(
        IoctxHandle,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut libc::timeval,
        u8,
    ) -> c_int;
    rados fn rados_unlock(IoctxHandle, *const c_char, *const c_char, *const c_char) -> c_int;
    rados fn rados_list_lockers(
        IoctxHandle,
        *const c_char,
        *const c_char,
        *mut c_int,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> isize;
    rados fn rados_break_lock(
        IoctxHandle,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
    ) -> c_int;
    rados fn rados_mon_command(
        RadosHandle,
        *mut *const c_char,
        usize,
        *const c_char,
        usize,
        *mut *mut c_char,
        *mut usize,
        *mut *mut c_char,
        *mut usize,
    ) -> c_int;
    rados fn rados_buffer_free(*mut c_char);

    rbd fn rbd_version(*mut c_int, *mut c_int, *mut c_int);
    rbd fn rbd_list2(IoctxHandle, *mut ImageSpec, *mut usize) -> c_int;
    rbd fn rbd_image_spec_list_cleanup(*mut ImageSpec, usize);
    rbd fn rbd_image_options_create(*mut OptionsHandle);
    rbd fn rbd_image_options_destroy(OptionsHandle);
    rbd fn rbd_image_options_set_uint64(OptionsHandle, c_int, u64) -> c_int;
    rbd fn rbd_create4(IoctxHandle, *const c_char, u64, OptionsHandle) -> c_int;
    rbd fn rbd_remove(IoctxHandle, *const c_char) -> c_int;
    rbd fn rbd_open(IoctxHandle, *const c_char, *mut ImageHandle, *const c_char) -> c_int;
    rbd fn rbd_open_read_only(IoctxHandle, *const c_char, *mut ImageHandle, *const c_char) -> c_int;
    rbd fn rbd_close(ImageHandle) -> c_int;
    rbd fn rbd_stat(ImageHandle, *mut ImageInfo, usize) -> c_int;
    rbd fn rbd_get_size(ImageHandle, *mut u64) -> c_int;
    rbd fn rbd_get_features(ImageHandle, *mut u64) -> c_int;
    rbd fn rbd_get_flags(ImageHandle, *mut u64) -> c_int;
    rbd fn rbd_resize2(ImageHandle, u64, bool, ProgressCallback, *mut c_void) -> c_int;
    rbd fn rbd_read(ImageHandle, u64, usize, *mut c_char) -> isize;
    rbd fn rbd_write(ImageHandle, u64, usize, *const c_char) -> isize;
    rbd fn rbd_discard(ImageHandle, u64, u64) -> c_int;
    rbd fn rbd_write_zeroes(ImageHandle, u64, usize, c_int, c_int) -> isize;
    rbd fn rbd_flush(ImageHandle) -> c_int;
    rbd fn rbd_aio_create_completion(*mut c_void, CompletionCallback, *mut CompletionHandle) -> c_int;
    rbd fn rbd_aio_wait_for_complete(CompletionHandle) -> c_int;
    rbd fn rbd_aio_get_return_value(CompletionHandle) -> isize;
    rbd fn rbd_aio_release(CompletionHandle);
    rbd fn rbd_aio_read2(ImageHandle, u64, usize, *mut c_char, CompletionHandle, c_int) -> c_int;
    rbd fn rbd_aio_write2(ImageHandle, u64, usize, *const c_char, CompletionHandle, c_int) -> c_int;
    rbd fn rbd_aio_discard(ImageHandle, u64, u64, CompletionHandle) -> c_int;
    rbd fn rbd_aio_write_zeroes(ImageHandle, u64, usize, CompletionHandle, c_int, c_int) -> c_int;
    rbd fn rbd_diff_iterate2(
        ImageHandle,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int;
    rbd fn rbd_namespace_exists(IoctxHandle, *const c_char, *mut bool) -> c_int;
    rbd fn rbd_get_id(ImageHandle, *mut c_char, usize) -> c_int;
    rbd fn rbd_get_modify_timestamp(ImageHandle, *mut libc::timespec) -> c_int;
    rbd fn rbd_get_create_timestamp(ImageHandle, *mut libc::timespec) -> c_int;
    rbd fn rbd_lock_acquire(ImageHandle, c_int) -> c_int;
    rbd fn rbd_lock_release(ImageHandle) -> c_int;
    rbd fn rbd_lock_get_owners(ImageHandle, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd fn rbd_lock_get_owners_cleanup(*mut *mut c_char, usize);
    rbd fn rbd_lock_break(ImageHandle, c_int, *const c_char) -> c_int;
    rbd fn rbd_snap_create(ImageHandle, *const c_char) -> c_int;
    rbd fn rbd_snap_rollback(ImageHandle, *const c_char) -> c_int;
    rbd fn rbd_snap_remove(ImageHandle, *const c_char) -> c_int;
    rbd fn rbd_snap_list(ImageHandle, *mut SnapInfo, *mut c_int) -> c_int;
    rbd fn rbd_snap_list_end(*mut SnapInfo);
    rbd fn rbd_snap_exists(ImageHandle, *const c_char, *mut bool) -> c_int;
    rbd fn rbd_watchers_list(ImageHandle, *mut ImageWatcher, *mut usize) -> c_int;
    rbd fn rbd_watchers_list_cleanup(*mut ImageWatcher, usize);
    rbd fn rbd_metadata_get(ImageHandle, *const c_char, *mut c_char, *mut usize) -> c_int;
    rbd fn rbd_metadata_set(ImageHandle, *const c_char, *const c_char) -> c_int;
    rbd fn rbd_metadata_remove(ImageHandle, *const c_char) -> c_int;
    rbd fn rbd_metadata_list(
        ImageHandle,
        *const c_char,
        u64,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> c_int;
    rbd fn rbd_deep_copy_with_progress(
        ImageHandle,
        IoctxHandle,
        *const c_char,
        OptionsHandle,
        ProgressCallback,
        *mut c_void,
    ) -> c_int;
}

// SAFETY: the table holds plain function pointers and library handles; librados and
// librbd are thread-safe libraries whose entry points may be called from any thread.
unsafe impl Send for Api {}
// SAFETY: as above; the table is never mutated after it is built.
unsafe impl Sync for Api {}

/// Opens both libraries and resolves every function, or says which package is missing.
pub(crate) fn load_from(rados_soname: &str, rbd_soname: &str) -> Result<Api, LoadError> {
    let open = |soname: &str| {
        // SAFETY: loading librados/librbd runs their static initialisers, which only set
        // up Ceph's own globals; nothing in backupfs depends on load order.
        unsafe { Library::new(soname) }.map_err(|e| LoadError {
            library: soname.to_string(),
            reason: e.to_string(),
        })
    };
    let rados = open(rados_soname)?;
    let rbd = open(rbd_soname)?;
    Api::resolve(rados, rbd)
}

/// The process-wide table: loaded on first use, kept (and the libraries mapped) until
/// exit. Unloading librados while its threads may still run would be unsound, and a
/// failed load is remembered, so every caller gets the same answer.
pub(crate) fn api() -> Result<&'static Api, LoadError> {
    API.get_or_init(|| load_from(LIBRADOS, LIBRBD))
        .as_ref()
        .map_err(Clone::clone)
}

static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();

/// Whether this process has loaded librados and librbd. Their clients are kept until exit
/// with their threads running, and exit() would run Ceph's static destructors under those
/// threads: a process that loaded them ends with `_exit` (see main.rs).
pub fn loaded() -> bool {
    API.get().is_some_and(Result::is_ok)
}

/// Whether librbd can be used on this machine; the error names the Debian package.
/// For start-up and `check-config` of a configuration with an `rbd` backend.
pub fn check_available() -> Result<(), LoadError> {
    api().map(|_| ())
}

/// librados' and librbd's versions, e.g. ("3.0.0", "1.16.0"), for the start-up log.
pub fn versions() -> Result<(String, String), LoadError> {
    let api = api()?;
    let mut v = [[0 as c_int; 3]; 2];
    // SAFETY: both functions only write three ints through the pointers given.
    unsafe {
        (api.rados_version)(&mut v[0][0], &mut v[0][1], &mut v[0][2]);
        (api.rbd_version)(&mut v[1][0], &mut v[1][1], &mut v[1][2]);
    }
    let text = |v: [c_int; 3]| format!("{}.{}.{}", v[0], v[1], v[2]);
    Ok((text(v[0]), text(v[1])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_names_the_debian_package() {
        let err = match load_from("librados-backupfs-test-missing.so.2", LIBRBD) {
            Ok(_) => panic!("a library that does not exist loaded"),
            Err(err) => err,
        };
        let message = err.to_string();
        assert!(message.contains("librbd1"), "{message}");
        assert!(
            message.contains("librados-backupfs-test-missing.so.2"),
            "{message}"
        );
    }

    #[test]
    fn structs_match_the_c_layout() {
        // Sizes from the C headers on x86_64/aarch64 (LP64).
        assert_eq!(
            std::mem::size_of::<ImageInfo>(),
            8 * 3 + 4 + 24 + 4 + 8 + 96
        );
        assert_eq!(std::mem::size_of::<ImageSpec>(), 16);
        assert_eq!(std::mem::size_of::<SnapInfo>(), 24);
        assert_eq!(std::mem::size_of::<ImageWatcher>(), 24);
    }
}
