#!/usr/bin/env bash
# Make password logins of Leasehold's lh_ roles real on a trust-configured test
# cluster: VALID UNTIL and passwords mean nothing under `trust`.
# Idempotent; run as root (it edits the running cluster's pg_hba.conf).
set -euo pipefail

PSQL=(psql -U postgres -h 127.0.0.1 -X -At -v ON_ERROR_STOP=1)
REGEX_LINE='host all /^lh_ 127.0.0.1/32 scram-sha-256'
# PostgreSQL < 16 reads "/^lh_" as a literal user name, not a regex. There the
# tests make each group role a member of this role, and `+role` matches members
# (recursively, so the login roles inside the group too).
GROUP_ROLE='leasehold_scram_login'
GROUP_LINE="host all +$GROUP_ROLE 127.0.0.1/32 scram-sha-256"

hba=$("${PSQL[@]}" -c 'show hba_file')
version=$("${PSQL[@]}" -c 'show server_version_num')
if [[ ! -f "$hba" ]]; then
    echo "pg-setup: hba file '$hba' not found" >&2
    exit 1
fi

add_line() {
    local line=$1 first tmp
    if grep -qxF "$line" "$hba"; then
        echo "pg-setup: $hba already has: $line"
        return
    fi
    # pg_hba.conf is first-match: the line must come before the trust lines.
    first=$(grep -nvE '^[[:space:]]*(#|$)' "$hba" | head -n1 | cut -d: -f1 || true)
    tmp=$(mktemp "$hba.XXXXXX")
    if [[ -z "$first" ]]; then
        cat "$hba" > "$tmp"
        printf '%s\n' "$line" >> "$tmp"
    else
        awk -v n="$first" -v line="$line" 'NR == n { print line } { print }' "$hba" > "$tmp"
    fi
    chown --reference="$hba" "$tmp"
    chmod --reference="$hba" "$tmp"
    mv "$tmp" "$hba"
    echo "pg-setup: added to $hba: $line"
}

add_line "$REGEX_LINE"
if (( version < 160000 )); then
    "${PSQL[@]}" -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$GROUP_ROLE') THEN
            CREATE ROLE $GROUP_ROLE NOLOGIN;
        END IF; END \$\$" > /dev/null
    add_line "$GROUP_LINE"
fi

"${PSQL[@]}" -c 'select pg_reload_conf()' > /dev/null
"${PSQL[@]}" -c 'select line_number, error from pg_hba_file_rules where error is not null' \
    | { if read -r bad; then echo "pg-setup: pg_hba.conf error: $bad" >&2; exit 1; fi; }
echo "pg-setup: done (server_version_num $version)"
