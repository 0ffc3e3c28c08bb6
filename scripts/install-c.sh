#!/usr/bin/env bash
# Installs the C ABI of aegis-ipc under a prefix:
#   PREFIX/lib/libaegis_ipc.so.0.1.0 (+ .so.0 and .so links), PREFIX/lib/libaegis_ipc.a,
#   PREFIX/include/aegis_ipc.h, PREFIX/lib/pkgconfig/aegis-ipc.pc and aegis-ipc-static.pc
# so that `cc app.c $(pkg-config --cflags --libs aegis-ipc)` links the shared library and
# `cc app.c $(pkg-config --static --cflags --libs aegis-ipc-static)` the static one (with
# the system libraries it needs). Usage: scripts/install-c.sh [PREFIX]  (default /usr/local)
# AEGIS_PROFILE=debug installs the debug build instead of the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
profile="${AEGIS_PROFILE:-release}"
# AEGIS_CARGO_FLAGS: extra cargo flags (the tests pass the features their build unified).
if [ "$profile" = release ]; then
    cargo build --quiet --release -p aegis-ffi ${AEGIS_CARGO_FLAGS:-}
else
    cargo build --quiet -p aegis-ffi ${AEGIS_CARGO_FLAGS:-}
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
major="${version%%.*}"
target="${CARGO_TARGET_DIR:-target}/$profile"
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$target/libaegis_ipc.so" "$prefix/lib/libaegis_ipc.so.$version"
ln -sf "libaegis_ipc.so.$version" "$prefix/lib/libaegis_ipc.so.$major"
ln -sf "libaegis_ipc.so.$major" "$prefix/lib/libaegis_ipc.so"
install -m 0644 "$target/libaegis_ipc.a" "$prefix/lib/libaegis_ipc.a"
install -m 0644 include/aegis_ipc.h "$prefix/include/aegis_ipc.h"
cat > "$prefix/lib/pkgconfig/aegis-ipc.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: aegis-ipc
Description: Shared-memory IPC bus for one Linux host (C ABI)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -laegis_ipc
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
PC
cat > "$prefix/lib/pkgconfig/aegis-ipc-static.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: aegis-ipc-static
Description: Shared-memory IPC bus for one Linux host (C ABI, static library)
Version: $version
Cflags: -I\${includedir}
Libs: \${libdir}/libaegis_ipc.a
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
PC
echo "installed aegis-ipc $version ($profile) under $prefix"
