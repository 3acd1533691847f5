//! The standard `process_*` metrics of the running binary, read from `/proc` at
//! scrape time (nothing is counted in between). Names and meanings are those of the
//! Prometheus client libraries, so existing dashboards and alerts apply.

use super::text::Exposition;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (USER_HZ, 100 on every
/// Linux architecture the kernel exposes to user space).
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc` says about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
}

impl ProcessStats {
    /// Reads this process's statistics; `None` off Linux or if `/proc` is absent.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_boot_time(&s))?;
        let mut stats = parse_stat(&stat, boot_time)?;
        stats.resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_resident_bytes(&s))
            .unwrap_or(0);
        stats.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        stats.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| parse_max_fds(&s));
        Some(stats)
    }

    /// Writes the `process_*` families.
    pub fn write(&self, out: &mut Exposition, binary: &str) {
        out.counter(
            "process_cpu_seconds_total",
            &format!("CPU time (user and system) used by this {binary} process, in seconds."),
            self.cpu_seconds,
        );
        out.gauge(
            "process_resident_memory_bytes",
            &format!("Resident memory of this {binary} process, in bytes."),
            self.resident_bytes,
        );
        out.gauge(
            "process_virtual_memory_bytes",
            &format!("Virtual memory of this {binary} process, in bytes."),
            self.virtual_bytes,
        );
        out.gauge(
            "process_start_time_seconds",
            &format!("When this {binary} process started, in seconds since the Unix epoch."),
            self.start_time_seconds,
        );
        out.gauge(
            "process_open_fds",
            &format!("File descriptors (sockets included) open in this {binary} process."),
            self.open_fds,
        );
        if let Some(max) = self.max_fds {
            out.gauge(
                "process_max_fds",
                &format!("The open file descriptor limit of this {binary} process."),
                max,
            );
        }
        out.gauge(
            "process_threads",
            &format!("Threads of this {binary} process."),
            self.threads,
        );
    }
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Fields of `/proc/self/stat` (proc(5)); the command name in parentheses may
/// contain spaces, so fields are counted after its closing parenthesis.
fn parse_stat(stat: &str, boot_time: f64) -> Option<ProcessStats> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // after_name starts at field 3 (state); field N is at index N - 3.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let utime = field(14)?;
    let stime = field(15)?;
    let threads = field(20)?;
    let start_ticks = field(22)?;
    let vsize = field(23)?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / TICKS_PER_SECOND,
        resident_bytes: 0,
        virtual_bytes: vsize,
        start_time_seconds: boot_time + start_ticks as f64 / TICKS_PER_SECOND,
        open_fds: 0,
        max_fds: None,
        threads,
    })
}

/// `VmRSS` of `/proc/self/status` (in kB there, whatever the page size).
fn parse_resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit of "Max open files" in `/proc/self/limits`.
fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let stat = "4242 (ipc server) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 12345 1048576000 2560 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stats = parse_stat(stat, 1_700_000_000.0).unwrap();
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.threads, 7);
        assert_eq!(stats.start_time_seconds, 1_700_000_123.45);
        assert_eq!(stats.virtual_bytes, 1_048_576_000);
        assert_eq!(
            parse_resident_bytes("Name:\tipc-server\nVmRSS:\t   10240 kB\n"),
            Some(10 << 20)
        );
    }

    #[test]
    fn parses_boot_time_and_fd_limit() {
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000.0)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn reads_this_process() {
        let stats = ProcessStats::read().expect("/proc on Linux");
        assert!(stats.resident_bytes > 0);
        assert!(stats.open_fds > 0);
        assert!(stats.start_time_seconds > 1_600_000_000.0);
    }
}
