#!/usr/bin/env bash
# Make a private CA and a TLS certificate for a SuperLink, for loopback or a named host.
#   simulations/make_certs.sh OUTDIR [HOST_OR_IP ...]     (default: 127.0.0.1 localhost)
# Writes OUTDIR/ca.crt (give it to SuperNodes and the flwr CLI as root certificates), OUTDIR/ca.key (keep
# private), OUTDIR/server.pem and OUTDIR/server.key (the SuperLink's --ssl-certfile / --ssl-keyfile).
set -euo pipefail
out=${1:?usage: make_certs.sh OUTDIR [HOST_OR_IP ...]}
shift || true
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(127.0.0.1 localhost)
mkdir -p "$out"
san=""
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}
openssl req -x509 -newkey rsa:3072 -nodes -days 365 -subj "/CN=fedlvc test CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=${hosts[0]}" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days 365 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
echo "certificates for ${hosts[*]} in $out"
