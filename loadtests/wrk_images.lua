-- wrk script: POST a different JSON body (loadtests/wrk_bodies.py) with every request, in turn, and report the
-- answers that were not 2xx/3xx.
--   wrk -t1 -c64 -d20s -s loadtests/wrk_images.lua URL -- DIR COUNT [OFFSET] [THREADS]
-- Thread k of THREADS (give wrk's -t; default 1) starts at OFFSET + k * COUNT / THREADS, so that no image is sent
-- twice until COUNT requests have been sent: the server's encoded-image cache never answers for the encoder.
local bodies, n, i = {}, 0, 0
local created = 0

function setup(thread)
  thread:set("index", created)
  created = created + 1
end

function init(args)
  local dir, count = args[1], tonumber(args[2])
  local offset, threads = tonumber(args[3] or "0"), tonumber(args[4] or "1")
  for k = 0, count - 1 do
    local f = assert(io.open(dir .. "/" .. k .. ".json", "rb"))
    bodies[k + 1] = f:read("*a")
    f:close()
  end
  n = count
  i = (offset + index * math.floor(count / threads)) % n
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  i = i % n + 1
  return wrk.format(nil, nil, nil, bodies[i])
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx answers: %d of %d\n", summary.errors.status, summary.requests))
end
