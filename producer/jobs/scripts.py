"""Every Lua script atelier runs in Redis, in one place (as its keys are in
:mod:`producer.core.keys`).

A script is how a check and the writes it guards happen in one step: Redis runs it
whole, with nothing interleaved. The store's scripts (:class:`producer.jobs.store.JobStore`)
come first, then the idempotency key's, the dispatcher's and the API's rate limit.

Most scripts name their keys in ``KEYS``. The job list's sets are the exception: which
sets a job is in follows from its owner, kind, model and status, read inside the
script, so their names are built there from :data:`producer.core.keys.JOB_LIST`
(atelier runs on one Redis, or a Sentinel-managed primary; not on Redis Cluster).
"""

from producer.core import keys as K

#: Shared by the scripts below: Redis's own clock (one clock for every worker's lease,
#: whatever their hosts' clocks say) and the terminal statuses.
PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_terminal(s)
  return s == 'succeeded' or s == 'failed' or s == 'cancelled' or s == 'expired'
end
"""

#: The job list (producer/jobs/joblist.py). A job's *entry* is
#: ``<member>\t<owner>\t<kind>\t<model>``; it is in the 8 sets of its owner that its
#: status, kind and model match (each filter given or ``*``). ``list_prune`` takes out of
#: the list up to ``budget`` finished jobs whose records have expired.
JOB_LIST = (
    f"""
local LIST, JOB, EXPIRY = '{K.JOB_LIST}', '{K.JOB}', '{K.JOB_LIST_EXPIRY}'
"""
    + """
local function list_sets(entry, status, op)
  local member, owner, kind, model = string.match(entry, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
  if not member then return end
  local base = LIST .. owner .. ':' .. status .. ':'
  for _, key in ipairs({base .. '*:*', base .. kind .. ':*', base .. '*:' .. model,
                        base .. kind .. ':' .. model}) do
    if op == 'add' then redis.call('ZADD', key, 0, member) else redis.call('ZREM', key, member) end
  end
end
-- A status change: out of the old status's sets, into the new one's. The sets of any
-- status are written each time too (a no-op but for a job from before the list).
local function list_move(entry, old, new)
  list_sets(entry, '*', 'add')
  if old then list_sets(entry, old, 'rem') end
  list_sets(entry, new, 'add')
end
local function list_prune(now, budget)
  local due = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now, 'LIMIT', 0, budget)
  for _, item in ipairs(due) do
    local status, entry = string.match(item, '^([^\t]*)\t(.*)$')
    list_sets(entry, '*', 'rem')
    list_sets(entry, status, 'rem')
    redis.call('ZREM', EXPIRY, item)
  end
  return #due
end
"""
)

APPLY = (
    PRELUDE
    + JOB_LIST
    + """
-- The arguments, named (producer.jobs.script_io.ApplyKeys and ApplyArgs build them in
-- this order, and a test holds the two to it).
local job_key = KEYS[1]
local log_key = KEYS[2]
local stream_key = KEYS[3]
local queue_key = KEYS[4]
local claim_key = KEYS[5]
local leases_key = KEYS[6]
local allowed = ARGV[1]
local token = ARGV[2]
local status = ARGV[3]
local new_token = ARGV[4]
local record = ARGV[5]
local ts = ARGV[6]
local ttl = ARGV[7]
local maxlen = ARGV[8]
local job_id = ARGV[9]
local score = ARGV[10]
local claim = ARGV[11]
local claim_ttl = ARGV[12]
local lease = ARGV[13]
local announce = ARGV[14]
local entry = ARGV[15]
local current = redis.call('HGET', job_key, 'status')
if allowed == '__new__' then
  if current then return {0, current} end
  -- An Idempotency-Key already naming a job: a concurrent request with it won.
  if claim ~= '' and redis.call('EXISTS', claim_key) == 1 then return {0, 'claimed'} end
else
  if not current then return {0, '__missing__'} end
  -- A terminal record never changes, whatever the caller allows.
  if is_terminal(current) then return {0, current} end
  local permitted = false
  for s in string.gmatch(allowed, '[^,]+') do
    if s == current then permitted = true end
  end
  if not permitted then return {0, current} end
  local fence = redis.call('HGET', job_key, 'token') or 'none'
  -- A fresh token already in place means this very call ran and its reply was lost:
  -- answer as it did, so a retried call does not look fenced.
  if new_token ~= '' and new_token ~= 'none' and fence == new_token then return {1, 'replayed'} end
  if token ~= '*' and fence ~= token then return {0, 'fenced'} end
  -- The lease: 'held:<worker>' (a start: this worker holds the job's message), or
  -- 'expired:<worker>|<tag>' (a take-back: that lease, and it has run out).
  if lease ~= '' then
    local holder = redis.call('HGET', job_key, 'lease') or ''
    local mode, want = string.match(lease, '^(%a+):(.*)$')
    if mode == 'held' then
      if holder ~= want then return {0, 'fenced'} end
    else
      local tag = redis.call('HGET', job_key, 'tag') or ''
      local expiry = redis.call('ZSCORE', leases_key, job_id)
      if holder .. '|' .. tag ~= want then return {0, 'lease_changed'} end
      if expiry and tonumber(expiry) > now_ms() then return {0, 'lease_renewed'} end
    end
  end
end
-- Events first: an XADD with an explicit id is the only call here that can fail, and
-- a failure must leave the record as it was. Each event is three arguments: its type,
-- its data for the job's own log, and its data for the global stream ('' when the
-- same; a preview picture rides only in the job's log).
local ids = {}
for i = 16, #ARGV, 3 do
  local shared = ARGV[i + 2]
  if shared == '' then shared = ARGV[i + 1] end
  local id = redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, '*',
                        'type', ARGV[i], 'job_id', job_id, 'ts', ts, 'data', shared)
  redis.call('XADD', log_key, id,
             'type', ARGV[i], 'job_id', job_id, 'ts', ts, 'data', ARGV[i + 1])
  table.insert(ids, id)
end
if status ~= '' then
  redis.call('HSET', job_key, 'status', status)
  -- The queue index holds exactly the jobs waiting for a worker.
  if status ~= 'queued' then redis.call('ZREM', queue_key, job_id) end
  -- The job list (entry: the job's) follows the status in the same step; a finished
  -- job leaves it when its record expires.
  if entry ~= '' and status ~= current then
    list_move(entry, current, status)
    if is_terminal(status) and tonumber(ttl) > 0 then
      redis.call('ZADD', EXPIRY, now_ms() + tonumber(ttl) * 1000, status .. '\t' .. entry)
      list_prune(now_ms(), 4)
    end
  end
end
if string.sub(lease, 1, 8) == 'expired:' or is_terminal(status) then
  -- Taken back, or ended: nobody holds the job any more.
  redis.call('HDEL', job_key, 'lease', 'tag')
  redis.call('ZREM', leases_key, job_id)
end
-- A new queued job, or one taken back from a lost worker, waits in its queue again.
if score ~= '' and not is_terminal(status) then
  redis.call('ZADD', queue_key, score, job_id)
end
if new_token ~= '' then redis.call('HSET', job_key, 'token', new_token) end
if record ~= '' then redis.call('HSET', job_key, 'doc', record) end
if announce ~= '' then redis.call('HSET', job_key, 'announced', announce) end
-- The key and the record it names appear together or not at all.
if claim ~= '' then redis.call('SET', claim_key, claim, 'EX', claim_ttl) end
if tonumber(ttl) > 0 then
  redis.call('EXPIRE', job_key, ttl)
  redis.call('EXPIRE', log_key, ttl)
end
return {1, table.concat(ids, ',')}
"""
)

# A worker took the job's message: lease it, unless another worker holds it (then the
# message is a duplicate and is dropped; the holder's lease, or the reconciler when it
# runs out, decides what happens to the job). Returns the hash, to start from.
HOLD = (
    PRELUDE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'__missing__'} end
if is_terminal(status) then return {status} end
local holder = redis.call('HGET', KEYS[1], 'lease')
if holder and holder ~= ARGV[1] then return {'held', holder} end
redis.call('HSET', KEYS[1], 'lease', ARGV[1], 'tag', ARGV[2])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[3]), ARGV[4])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# The heartbeat: every job this worker still holds gets ARGV[2] ms more.
RENEW = (
    PRELUDE
    + """
local expiry = now_ms() + tonumber(ARGV[2])
local renewed = 0
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'lease') == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i + 1])
    renewed = renewed + 1
  end
end
return renewed
"""
)

# The worker lets go of a job it did not end (given back at shutdown, or dropped).
RELEASE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'tag') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'lease', 'tag')
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""

FLAG_CANCEL = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('RPUSH', KEYS[2], '1')
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""

# Idempotency-Key: delete a key only if it still holds what the caller read (the record
# it named has expired; a key naming a newer job is left alone).
RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The dispatcher: take up to ARGV[3] webhook retries due by ARGV[1] (ms), leasing each
# until ARGV[2].
CLAIM_RETRIES = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
"""

# The API's per-key rate limit. Generic cell rate algorithm: one timestamp per key, on
# Redis's clock so replicas agree. Returns 0 (allowed) or the ms to wait.
RATE_LIMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - burst * interval
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return 0
"""


# A page of the job list: up to ARGV[2] members of the set KEYS[1] after the cursor
# ARGV[1] ('' from the newest), newest first, each with its record; ARGV[3] expired
# jobs pruned first. A member whose record is gone anyway (evicted under maxmemory) is
# dropped from this set and skipped, a bounded number of times.
LIST_PAGE = (
    PRELUDE
    + JOB_LIST
    + """
list_prune(now_ms(), tonumber(ARGV[3]))
local want = tonumber(ARGV[2])
local from = '+'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local out, found, dropped = {}, 0, 0
while found < want and dropped < 1000 do
  local batch = redis.call('ZRANGE', KEYS[1], from, '-', 'BYLEX', 'REV', 'LIMIT', 0, want - found)
  if #batch == 0 then break end
  for _, member in ipairs(batch) do
    local id = string.match(member, '^%d+:(.*)$')
    local doc = id and redis.call('HGET', JOB .. id, 'doc')
    if doc then
      table.insert(out, member)
      table.insert(out, doc)
      found = found + 1
    else
      redis.call('ZREM', KEYS[1], member)
      dropped = dropped + 1
    end
    from = '(' .. member
  end
end
return out
"""
)
