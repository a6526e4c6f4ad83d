//! The one source of randomness: the operating system's, through ring.

use ring::rand::{SecureRandom, SystemRandom};

/// Fills `bytes` from the OS random number generator.
pub fn fill(bytes: &mut [u8]) {
    // The OS generator fails only when the kernel cannot provide randomness at all; no id, key
    // or secret may be made then, so stopping is the only safe answer.
    SystemRandom::new()
        .fill(bytes)
        .expect("the operating system's random number generator failed");
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    fill(&mut bytes);
    bytes
}
