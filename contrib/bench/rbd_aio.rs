//! One measured pass of the RBD client's queued I/O: writes (or reads) a whole image
//! sequentially in large requests with N in flight, and prints one line of results with
//! the process's peak RSS. Run by contrib/bench/rbd.sh; never part of the test suite.
//!
//! cargo run --release --example rbd_aio -- --conf C --client admin --pool P \
//!     --image NAME --mode write|read [--size-mib 1024] [--block-mib 4] [--depth 8]
//!     [--hint sequential|none] [--malloc fixed|glibc]

use backupfs::volume::rbd::{AioQueue, Cluster, ImageOptions, Timeouts};
use std::time::Instant;

struct Args {
    conf: String,
    client: String,
    pool: String,
    image: String,
    mode: String,
    size: u64,
    block: usize,
    depth: usize,
    sequential: bool,
    fixed_mmap_threshold: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        conf: "/etc/ceph/ceph.conf".into(),
        client: "admin".into(),
        pool: "rbd".into(),
        image: "backupfs-bench".into(),
        mode: "write".into(),
        size: 1024 << 20,
        block: 4 << 20,
        depth: 8,
        sequential: false,
        fixed_mmap_threshold: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--conf" => args.conf = value,
            "--client" => args.client = value,
            "--pool" => args.pool = value,
            "--image" => args.image = value,
            "--mode" => args.mode = value,
            "--size-mib" => args.size = number()? << 20,
            "--block-mib" => args.block = (number()? << 20) as usize,
            "--depth" => args.depth = number()? as usize,
            "--hint" => args.sequential = value == "sequential",
            "--malloc" => args.fixed_mmap_threshold = value != "glibc",
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(args)
}

/// Peak resident memory of this process, from /proc (kB).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = Cluster::connect(args.conf.as_ref(), &args.client, Timeouts::default())?;
    let io = cluster.ioctx(&args.pool, None)?;
    if args.mode == "write" {
        match io.remove_image(&args.image) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
        io.create_image(&args.image, args.size, &ImageOptions::default())?;
    }
    let image = if args.mode == "write" {
        io.open_image(&args.image)?
    } else {
        io.open_image_read_only(&args.image, None)?
    };
    let size = image.size()?;
    // Not all-zero and not one repeated block: what a real volume's data costs.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut fresh_block = || -> Vec<u8> {
        let mut block = Vec::with_capacity(args.block);
        while block.len() < args.block {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            block.extend_from_slice(&seed.to_le_bytes());
        }
        block.truncate(args.block);
        block
    };
    // Reads only need room; writes need data.
    let mut spare: Vec<Vec<u8>> = (0..args.depth)
        .map(|_| {
            if args.mode == "write" {
                fresh_block()
            } else {
                vec![0; args.block]
            }
        })
        .collect();

    let t0 = Instant::now();
    let mut queue = AioQueue::new(&image, args.depth);
    if args.sequential {
        queue = queue.sequential();
    }
    let mut offset = 0u64;
    let mut bytes = 0u64;
    while offset < size {
        let len = (size - offset).min(args.block as u64) as usize;
        let mut buffer = spare.pop().unwrap_or_else(&mut fresh_block);
        buffer.resize(len, 0);
        let done = if args.mode == "write" {
            queue.write(offset, buffer)?
        } else {
            queue.read(offset, buffer)?
        };
        if let Some(done) = done {
            bytes += done.bytes;
            spare.push(done.buffer);
        }
        offset += len as u64;
    }
    for done in queue.drain()? {
        bytes += done.bytes;
    }
    drop(queue);
    if args.mode == "write" {
        image.flush()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "mode={} hint={} malloc={} depth={} block_mib={} bytes={} seconds={:.3} mib_per_s={:.1} peak_rss_mib={:.1}",
        args.mode,
        if args.sequential {
            "sequential"
        } else {
            "none"
        },
        if args.fixed_mmap_threshold {
            "fixed"
        } else {
            "glibc"
        },
        args.depth,
        args.block >> 20,
        bytes,
        secs,
        bytes as f64 / secs / (1 << 20) as f64,
        peak_rss_kib() as f64 / 1024.0
    );
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("rbd_aio: {e}");
            std::process::exit(2);
        }
    };
    if args.fixed_mmap_threshold {
        // librados' messenger threads allocate a 4 MiB buffer for every reply; glibc
        // raises its mmap threshold after the first such free and from then on keeps
        // them in per-thread arenas, so peak RSS grows far past what is in flight
        // (read at depth 8: 146 MiB). A fixed threshold hands each back to the kernel
        // at once (78 MiB), at the price of fresh pages for every reply (that read
        // took 1.26 s instead of 0.95 s).
        // SAFETY: mallopt only changes an allocator parameter; no other thread runs.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    }
    if let Err(e) = run(&args) {
        eprintln!("rbd_aio: {e}");
        std::process::exit(1);
    }
}
