# shellcheck shell=bash
# A throwaway MariaDB primary for the benchmarks; meant to be *sourced* by
# scripts/bench:
#
#   . scripts/bench-mariadb.sh
#   bench_mariadb_start "$WORK"     # exports BENCH_MARIADB_{ADDR,PASSWORD,PID,SETTINGS}
#   ...                             # dbproxy: backend = "mysql", primary = $BENCH_MARIADB_ADDR,
#                                   # password_env = "BENCH_MARIADB_PASSWORD"
#   bench_mariadb_stop              # also fine twice, or when never started
#
# The server runs from WORKDIR/mariadb on a free loopback port (never 3306: a
# MariaDB of the machine may listen there and is left alone), socket in
# WORKDIR. Durability is a production primary's, not the tests' relaxed one
# (testkit/mariadb): every commit is fsynced in the InnoDB redo
# log and in the binlog, and the binlog (GTID, as replicas need) is on.
# mariadb-server and mariadb-client are installed with apt-get when mariadbd is
# missing.

BENCH_MARIADB_BUFFER_POOL=${BENCH_MARIADB_BUFFER_POOL:-512M}
BENCH_MARIADB_DURABILITY="innodb_flush_log_at_trx_commit=1 sync_binlog=1 log_bin=ON binlog_format=ROW gtid_strict_mode=1 innodb_doublewrite=1"

_bench_mariadb_bin() { # name: absolute path, also when sbin is not on PATH
	local p
	for p in "$(command -v "$1" 2>/dev/null)" "/usr/sbin/$1" "/usr/bin/$1"; do
		if [ -n "$p" ] && [ -x "$p" ]; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

_bench_mariadb_free_port() { # a loopback port nothing listens on, from the kernel
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_bench_mariadb_alive() { # pid: running (a zombie child not yet waited for is not)
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[ "${stat%% *}" != Z ]
}

_bench_mariadb_sql() { # sql: run as root over the socket
	"$(_bench_mariadb_bin mariadb)" --no-defaults --socket="$_BENCH_MARIADB_SOCKET" -uroot -N -B -e "$1"
}

# bench_mariadb_start WORKDIR
bench_mariadb_start() {
	local work=${1:?usage: bench_mariadb_start WORKDIR}
	if [ -n "${BENCH_MARIADB_PID:-}" ] && _bench_mariadb_alive "$BENCH_MARIADB_PID"; then
		echo "bench-mariadb: already running (pid $BENCH_MARIADB_PID)" >&2
		return 1
	fi
	if ! _bench_mariadb_bin mariadbd >/dev/null || ! _bench_mariadb_bin mariadb >/dev/null; then
		echo "bench-mariadb: installing mariadb-server and mariadb-client" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server mariadb-client >/dev/null
	fi
	local mariadbd install_db
	mariadbd=$(_bench_mariadb_bin mariadbd)
	install_db=$(_bench_mariadb_bin mariadb-install-db)
	local datadir=$work/mariadb
	_BENCH_MARIADB_SOCKET=$work/mariadb.sock
	_BENCH_MARIADB_LOG=$work/mariadb.err
	rm -rf "$datadir"
	mkdir -p "$datadir"
	if ! "$install_db" --no-defaults --user=root --datadir="$datadir" \
		--auth-root-authentication-method=normal --skip-test-db >"$work/mariadb-install.log" 2>&1; then
		echo "bench-mariadb: mariadb-install-db failed:" >&2
		cat "$work/mariadb-install.log" >&2
		return 1
	fi
	local port
	port=$(_bench_mariadb_free_port)
	# Redo log large enough that a 10 s write burst does not force checkpoint
	# flushing (as a production primary would be sized); everything else that
	# concerns durability stays at its safe value.
	"$mariadbd" --no-defaults --user=root \
		--datadir="$datadir" --socket="$_BENCH_MARIADB_SOCKET" \
		--port="$port" --bind-address=127.0.0.1 --skip-name-resolve \
		--pid-file="$work/mariadb.pid" --log-error="$_BENCH_MARIADB_LOG" --tmpdir="$work" \
		--server-id=1 --log-bin=binlog --binlog-format=ROW --gtid-strict-mode=1 \
		--innodb-flush-log-at-trx-commit=1 --sync-binlog=1 --innodb-doublewrite=1 \
		--innodb-buffer-pool-size="$BENCH_MARIADB_BUFFER_POOL" --innodb-log-file-size=512M \
		--max-connections=500 --performance-schema=OFF \
		</dev/null >/dev/null 2>&1 &
	BENCH_MARIADB_PID=$!
	export BENCH_MARIADB_PID
	local i
	for i in $(seq 1 300); do
		if ! _bench_mariadb_alive "$BENCH_MARIADB_PID"; then
			echo "bench-mariadb: mariadbd exited during start:" >&2
			tail -n 30 "$_BENCH_MARIADB_LOG" >&2
			wait "$BENCH_MARIADB_PID" 2>/dev/null || true
			unset BENCH_MARIADB_PID
			return 1
		fi
		_bench_mariadb_sql "SELECT 1" >/dev/null 2>&1 && break
		sleep 0.1
	done
	if ! _bench_mariadb_sql "SELECT 1" >/dev/null 2>&1; then
		echo "bench-mariadb: mariadbd not answering after 30 s:" >&2
		tail -n 30 "$_BENCH_MARIADB_LOG" >&2
		bench_mariadb_stop
		return 1
	fi
	# The same rights as the tests' application account: no SUPER, so
	# read_only would apply to it.
	BENCH_MARIADB_PASSWORD=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
	_bench_mariadb_sql "CREATE DATABASE chat;
		CREATE USER 'chat'@'127.0.0.1' IDENTIFIED BY '$BENCH_MARIADB_PASSWORD';
		GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER, REFERENCES
			ON chat.* TO 'chat'@'127.0.0.1';" || {
		bench_mariadb_stop
		return 1
	}
	BENCH_MARIADB_ADDR=127.0.0.1:$port
	local version
	version=$(_bench_mariadb_sql "SELECT VERSION()")
	BENCH_MARIADB_SETTINGS="MariaDB $version, $BENCH_MARIADB_DURABILITY, innodb_buffer_pool_size=$BENCH_MARIADB_BUFFER_POOL, innodb_log_file_size=512M, data on $(df --output=source "$datadir" | tail -n 1)"
	export BENCH_MARIADB_ADDR BENCH_MARIADB_PASSWORD BENCH_MARIADB_SETTINGS
}

# bench_mariadb_stop: SIGTERM (a clean InnoDB shutdown), SIGKILL after 30 s.
bench_mariadb_stop() {
	local pid=${BENCH_MARIADB_PID:-}
	unset BENCH_MARIADB_PID BENCH_MARIADB_ADDR BENCH_MARIADB_PASSWORD BENCH_MARIADB_SETTINGS
	[ -n "$pid" ] || return 0
	kill "$pid" 2>/dev/null || return 0
	local i
	for i in $(seq 1 300); do
		_bench_mariadb_alive "$pid" || break
		sleep 0.1
	done
	if _bench_mariadb_alive "$pid"; then
		echo "bench-mariadb: mariadbd $pid did not stop in 30 s; killing it" >&2
		kill -9 "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
	return 0
}
