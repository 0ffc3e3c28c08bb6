//! Payload codec for typed calls: bincode 2 over serde, in one place so it can be swapped.

use serde::{de::DeserializeOwned, Serialize};

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| e.to_string())
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    let (v, used) = bincode::serde::decode_from_slice(b, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    if used != b.len() {
        return Err(format!("{} trailing bytes", b.len() - used));
    }
    Ok(v)
}
