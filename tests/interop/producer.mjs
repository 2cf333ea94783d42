// Adds one job to a Conveyor queue the way any Node.js BullMQ producer would.
// usage: node producer.mjs <port> <prefix> <queue> <jobName> <jobId> '<json data>'
import { Queue } from 'bullmq';

const [port, prefix, queueName, jobName, jobId, data] = process.argv.slice(2);
const queue = new Queue(queueName, { prefix, connection: { host: '127.0.0.1', port: Number(port) } });
try {
  const job = await queue.add(jobName, JSON.parse(data), { jobId });
  console.log(JSON.stringify({ id: job.id }));
} finally {
  await queue.close();
}
