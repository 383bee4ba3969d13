// The Lua scripts lim-feeder runs in Redis (by EVALSHA). Both read the server's clock (TIME), so
// the hosts' clocks never matter; the lease script runs its own protocol clock over it, so that a
// step of the server's clock does not either. Amounts are integer token units (1/10,000 token), as
// in the segment; times are microseconds of the server's clock. docs/global.md proves the bound.
#pragma once

namespace lim::feeder {

// lease: renew, return, grant, in one step for one host and one global rate.
// KEYS[1] the rate's state (hash: tokens, ts, fence, run, ttl, grace, p, last, at: the TIME of
// the last accepted call); KEYS[2] its leases
// (hash: host -> "amount:expiry:want:weight:instance:seq", expiry in protocol-clock microseconds;
// the hosts' last weights share the bucket while several want); KEYS[3] (optional) the leases of
// the previous protocol (lim:global:{K}:leases, whose expiries are in TIME), for a rolling upgrade.
// ARGV: host, held (what the host still holds unspent: it has stopped spending anything beyond),
// returned (unspent tokens the host gave up before asking), want, ttl_us, burst (units), rate
// (units per second), grace_us, weight (the host's demand: its want scaled by how many of its
// workers wait; absent or empty, the want), instance (optional), elapsed_us (the caller's own
// CLOCK_MONOTONIC time since its previous call for this key: a lower bound of the real time
// between them; absent or empty, a hand call: bounded by grace alone), seq (optional: the
// caller's CLOCK_MONOTONIC microseconds when it asked, so increasing across an instance's calls
// and restarts). A call older than the last call of the same host and instance that Redis ran
// (its seq is lower) is refused (LIMSTALE): it is one the caller gave up on (a timeout, then a
// new connection) and Redis ran late, after a newer one; run, it would count what the host held
// then, not what the newer call left it (docs/global.md, "A call Redis runs late").
//
// The protocol clock p (docs/global.md, "The protocol clock"): every time this script reads TIME
// it advances p by clamp(TIME - last, 0, min(grace, the state's grace, elapsed_us)) and stores TIME
// as last, on a refused call too (else a refusal could last forever: p would never reach the
// expiry of the entry that causes it). Refill,
// lease expiry and the restart fence are in p, never in TIME: p runs no faster than Redis's clock
// and no faster than the caller's, so a forward step of Redis's clock adds at most min(grace,
// elapsed_us) to p (and leases expire no earlier than their hosts' local deadlines), and a backward
// step stops p for one call.
//
// A call whose host has a live lease of another instance is refused (an error reply, nothing
// changed but the clock's p and last: no entry, expired ones included, and no tokens, ts or at,
// so the next accepted call's cap counts every entry that stood since the previous accepted one,
// global.cap_review C1): two feeders under one host name would
// otherwise each keep the one lease Redis counts once. Invariant kept: tokens + sum(live leases) +
// sum(live leases of the previous protocol) <= burst. A lease lives until ttl + grace of p after
// its last renewal; the host stops spending at ttl after a time it took before asking. One
// lease_ttl per global rate: the state keeps the ttl and grace it runs under; a call with another
// ttl or grace while another host holds a live lease is refused (an error reply starting LIMTTL,
// nothing changed but p and last), since the fence after a restart of
// Redis is the first caller's ttl + grace and must outlast every host's lease. With no other live
// lease, the call's ttl and grace become the state's (how a ttl is changed: every host in turn). A
// state that is absent (first use, a restarted or flushed Redis), or that another server process
// wrote (its run_id differs: Redis restarted from an RDB snapshot or an AOF, or a replica promoted,
// any of which forgets the leases granted since), starts empty and grants nothing for one ttl +
// grace of p (the fence): every lease granted before has ended on its host by then. (INFO is
// allowed in scripts; Redis 7 replicates a script's effects, not the script.)
//
// Rolling upgrade: feeders of the previous protocol keep their state under lim:global:{K} and never
// read this one. So this script counts their live leases (expiry in TIME, as they wrote it) as
// outstanding, and writes one entry there, host "~lim-protocol-2", holding the whole burst until
// TIME + ttl + grace (never moved earlier: global.cap_review C6): the previous script then grants
// nothing and adopts nothing (its bucket is clamped to burst - outstanding), while its hosts run
// down the leases they hold. Returns {keep, granted, p}: the host may keep `keep` of what it held,
// plus `granted`.
inline constexpr const char* kLeaseScript = R"lua(
local host = ARGV[1]
local held = tonumber(ARGV[2])
local returned = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local burst = tonumber(ARGV[6])
local rate = tonumber(ARGV[7])
local grace = tonumber(ARGV[8])
local weight = tonumber(ARGV[9] or '') or want
if want <= 0 then weight = 0 end
local id = ARGV[10] or ''
local elapsed = tonumber(ARGV[11] or '') or grace
local seq = tonumber(ARGV[12] or '')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
local st = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'fence', 'run', 'ttl', 'grace', 'p', 'last',
                     'at')
local live = st[2] and st[4] == run and st[7] and st[8]
local tokens, ts, fence, p
if not live then
  p = now
  tokens = 0
  ts = p
  fence = p + ttl + grace
else
  tokens = tonumber(st[1])
  ts = tonumber(st[2])
  fence = tonumber(st[3])
  -- Capped by the state's grace too, not the caller's alone: the live leases' expiries are in
  -- the state's ttl + grace, and a caller with a longer one (refused LIMTTL below) must not move
  -- p past them at a forward step (global.pclock_review P3).
  local cap = math.min(grace, tonumber(st[6]) or grace)
  p = tonumber(st[7]) + math.max(0, math.min(now - tonumber(st[8]), cap, math.max(0, elapsed)))
end
-- A refused call saves the clock's advance (p and last) and nothing else: p must advance while
-- every caller is refused, or the entry that causes the refusal never expires
-- (global.pclock_review P1, P2). It deletes no entry either (an expired one is not live, deleted or
-- not): the next accepted call's refill covers the interval since the previous accepted one, and
-- its cap must count every entry that stood in it (global.cap_review C1).
local refusal = nil
local expired = {}
local outstanding = 0
local weights = weight
local others = 0
local mine = nil
local legacy = '~lim-protocol-2'
-- What every entry held since the previous call, before this one changes any (expired ones too;
-- of the previous protocol's, those live at some time since then): the refill of that interval is
-- capped by it (below).
local stood = 0
if KEYS[3] then
  -- The TIME of the previous accepted call (`at`; a refused call moves `last`, not the interval).
  local since = live and (tonumber(st[9]) or tonumber(st[8])) or now
  local old = redis.call('HGETALL', KEYS[3])
  -- The fence entry's expiry never moves earlier: a caller with a shorter ttl (refused LIMTTL, or
  -- a ttl change) must not end it while leases granted under a longer one live
  -- (global.cap_review C6).
  local fenced = now + ttl + grace
  for i = 1, #old, 2 do
    local a, e = string.match(old[i + 1], '^(%d+):(%d+):')
    if old[i] == legacy and tonumber(e) then fenced = math.max(fenced, tonumber(e)) end
    if old[i] ~= legacy and (tonumber(e) or 0) > now then
      outstanding = outstanding + (tonumber(a) or 0)
    end
    if old[i] ~= legacy and (tonumber(e) or 0) > since then
      stood = stood + (tonumber(a) or 0)
    end
  end
  redis.call('HSET', KEYS[3], legacy, string.format('%d:%d:0:0:', burst, fenced))
end
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local a, e, w, g, o, q = string.match(all[i + 1], '^(%d+):(%d+):(%d+):?(%d*):?(%x*):?(%d*)$')
  local amount = tonumber(a) or 0
  local expiry = tonumber(e) or 0
  stood = stood + amount
  if expiry <= p then
    expired[#expired + 1] = all[i]
  elseif all[i] == host then
    if o ~= '' and id ~= '' and o ~= id then
      refusal = refusal or ('LIMHOST another feeder (instance ' .. o .. ') holds a lease as host ' .. host .. ': give every feeder its own host name')
    end
    if seq and tonumber(q) and seq < tonumber(q) then
      refusal = refusal or ('LIMSTALE a newer call of this host ran already (seq ' .. q .. ' > ' .. seq .. ')')
    end
    mine = amount
  else
    outstanding = outstanding + amount
    others = others + 1
    if (tonumber(w) or 0) > 0 then weights = weights + (tonumber(g) or tonumber(w) or 0) end
  end
end
if not refusal and live and others > 0 and st[5] and (tonumber(st[5]) ~= ttl or tonumber(st[6]) ~= grace) then
  refusal = ('LIMTTL lease_ttl ' .. ttl .. ' us (grace ' .. grace .. ') differs from the ' .. st[5] .. ' us (grace ' .. (st[6] or '?') .. ') the other hosts hold leases under: give every host the same lease_ttl')
end
if refusal then
  if live then
    redis.call('HSET', KEYS[1], 'p', string.format('%d', p), 'last', string.format('%d', now))
  end
  return redis.error_reply(refusal)
end
for _, h in ipairs(expired) do
  redis.call('HDEL', KEYS[2], h)
end
-- Refill for the interval since the previous call (of any host), capped by the room the leases
-- left during it: no entry changed in it, and a host reports what it spent only now, so its lease
-- counts as unspent until now. (Capped by the leases as this call leaves them, a host that spent
-- its lease late in the interval got the refill of the time the bucket plus its lease was the
-- burst: over burst + rate x T; docs/global.md, "The bound, and its proof", step 2.)
if p > ts then
  if p > fence then
    tokens = math.min(tokens + (p - math.max(ts, fence)) * rate / 1000000,
                      math.max(tokens, burst - stood))
  end
  ts = p
end
local keep
if mine ~= nil then
  keep = math.min(held, mine)
  tokens = tokens + math.min(returned, mine - keep)
else
  keep = math.min(held, math.max(0, burst - outstanding - tokens))
end
keep = math.max(0, math.floor(keep))
tokens = math.max(0, math.min(tokens, burst - outstanding - keep))
-- While others want too, a host gets its share of the bucket in proportion to its weight (its
-- demand), never more than it wants. The shares of the hosts that want sum to at most the bucket.
local granted = 0
if p > fence and weights > 0 then
  granted = math.max(0, math.min(want, math.floor(tokens * weight / weights)))
end
tokens = tokens - granted
local lease = keep + granted
local seqs = seq and string.format('%d', seq) or ''
if lease > 0 then
  redis.call('HSET', KEYS[2], host,
             string.format('%d:%d:%d:%d:%s:%s', lease, p + ttl + grace, want, weight, id, seqs))
elseif want > 0 then
  redis.call('HSET', KEYS[2], host,
             string.format('0:%d:%d:%d:%s:%s', p + ttl + grace, want, weight, id, seqs))
else
  redis.call('HDEL', KEYS[2], host)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.4f', tokens), 'ts', string.format('%d', ts),
           'fence', string.format('%d', fence), 'run', run, 'ttl', string.format('%d', ttl),
           'grace', string.format('%d', grace), 'p', string.format('%d', p),
           'last', string.format('%d', now), 'at', string.format('%d', now))
return {keep, granted, p}
)lua";

// backoff: merge a host's BackoffWindow with the shared deadline, by max (never shortening).
// KEYS[1] the deadline (server microseconds). ARGV: the host's remaining backoff (us, 0 if none),
// tolerance_us (a push that extends by less is dropped, so the round trip cannot ratchet it).
// Returns the remaining backoff in microseconds as the server sees it (0 if none).
inline constexpr const char* kBackoffScript = R"lua(
local remaining = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
if remaining > 0 and now + remaining > d + tolerance then
  d = now + remaining
  redis.call('SET', KEYS[1], string.format('%d', d), 'PX', math.floor(remaining / 1000) + 60000)
end
return math.max(0, d - now)
)lua";

}  // namespace lim::feeder
