// What a BullMQ dashboard does to a queue: pause it, resume it, list its workers.
// usage: node admin.mjs <port> <prefix> <queue> <pause|resume|is-paused|workers|job> [job id]
import { Queue } from 'bullmq';

const [port, prefix, queueName, action, jobId] = process.argv.slice(2);
const queue = new Queue(queueName, { prefix, connection: { host: '127.0.0.1', port: Number(port) } });
try {
  let out;
  if (action === 'pause') {
    await queue.pause();
    out = { paused: await queue.isPaused() };
  } else if (action === 'resume') {
    await queue.resume();
    out = { paused: await queue.isPaused() };
  } else if (action === 'is-paused') {
    out = { paused: await queue.isPaused() };
  } else if (action === 'workers') {
    const workers = await queue.getWorkers();
    out = { count: workers.length, names: workers.map((w) => w.rawname) };
  } else if (action === 'job') {
    const job = await queue.getJob(jobId);
    out = job
      ? { id: job.id, state: await job.getState(), data: job.data, returnvalue: job.returnvalue }
      : null;
  } else {
    throw new Error(`unknown action ${action}`);
  }
  console.log(JSON.stringify(out));
} finally {
  await queue.close();
}
