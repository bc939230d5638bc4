//! Deterministic payloads, so both ends of a transfer can check the bytes without storing them.

use sha2::{Digest, Sha256};

/// Fills `buf` with the bytes at `offset` of the pattern stream for `seed`, each 8-byte block
/// a function of its position, so any slice can be produced independently.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let position = offset + i as u64;
        let block = mix(seed ^ (position / 8));
        *byte = block.to_le_bytes()[(position % 8) as usize];
    }
}

/// SHA-256 (hex) of the first `len` bytes of the pattern for `seed`.
pub fn sha256_hex(seed: u64, len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < len {
        let n = buf.len().min((len - offset) as usize);
        fill(seed, offset, &mut buf[..n]);
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    hex(&hasher.finalize())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// splitmix64: cheap and well mixed.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_agree_with_the_whole() {
        let mut whole = vec![0u8; 100];
        fill(7, 0, &mut whole);
        let mut part = vec![0u8; 30];
        fill(7, 50, &mut part);
        assert_eq!(&whole[50..80], &part[..]);
        assert_ne!(whole[..8], whole[8..16]);
    }

    #[test]
    fn sha_matches_filled_bytes() {
        let mut bytes = vec![0u8; 100_000];
        fill(3, 0, &mut bytes);
        assert_eq!(sha256_hex(3, 100_000), hex(&Sha256::digest(&bytes)));
    }
}
