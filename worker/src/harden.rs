//! Keeping the worker's own secrets out of its commands' reach, beyond the sandbox: the process
//! is made non-dumpable (so `/proc/<worker>/environ`, `mem` and `ptrace` need root's
//! `CAP_SYS_PTRACE`), and the broker password is overwritten where the kernel shows the process's
//! start-up arguments and environment (`/proc/<worker>/cmdline` and `environ` read that memory).

/// Makes this process non-dumpable and overwrites each of `secrets` in its start-up argument and
/// environment memory with `*`. Returns what could not be done, for a warning.
pub fn protect_process(secrets: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        problems.push(format!(
            "cannot make the worker non-dumpable: {}",
            std::io::Error::last_os_error()
        ));
    }
    let secrets: Vec<&[u8]> = secrets
        .iter()
        .map(|s| s.as_bytes())
        .filter(|s| !s.is_empty())
        .collect();
    if secrets.is_empty() {
        return problems;
    }
    match start_up_memory() {
        Some(regions) => {
            for (start, end) in regions {
                // SAFETY: [start, end) is this process's own argument or environment block as the
                // kernel reports it: mapped, writable stack memory that nothing else borrows.
                let block = unsafe {
                    std::slice::from_raw_parts_mut(start as *mut u8, end.saturating_sub(start))
                };
                for secret in &secrets {
                    overwrite_all(block, secret);
                }
            }
        }
        None => problems.push(
            "cannot find the worker's start-up memory in /proc/self/stat; the broker password \
             stays visible in /proc/<worker>/cmdline and environ to root"
                .into(),
        ),
    }
    problems
}

/// Replaces every occurrence of `secret` in `block` with `*`s.
fn overwrite_all(block: &mut [u8], secret: &[u8]) {
    let mut at = 0;
    while at + secret.len() <= block.len() {
        if &block[at..at + secret.len()] == secret {
            block[at..at + secret.len()].fill(b'*');
            at += secret.len();
        } else {
            at += 1;
        }
    }
}

/// The argument and environment blocks of this process: fields 48 to 51 of /proc/self/stat.
fn start_up_memory() -> Option<[(usize, usize); 2]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields are counted after its closing ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<usize> = after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // after_name starts at field 3.
    let field = |n: usize| fields.get(n - 3).copied().filter(|v| *v != 0);
    Some([(field(48)?, field(49)?), (field(50)?, field(51)?)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_of_a_secret_is_overwritten() {
        let mut block = b"WARREN_AMQP_URL=amqp://u:s3cret@h\0X=s3cret\0".to_vec();
        overwrite_all(&mut block, b"s3cret");
        assert_eq!(&block[..], b"WARREN_AMQP_URL=amqp://u:******@h\0X=******\0");
    }

    #[test]
    fn the_start_up_memory_is_found() {
        let [(args_start, args_end), (env_start, env_end)] = start_up_memory().unwrap();
        assert!(args_start < args_end && env_start < env_end);
    }
}
