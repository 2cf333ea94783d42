// Prints a Conveyor queue's job counts as a BullMQ dashboard would read them.
// usage: node counts.mjs <port> <prefix> <queue>
import { Queue } from 'bullmq';

const [port, prefix, queueName] = process.argv.slice(2);
const queue = new Queue(queueName, { prefix, connection: { host: '127.0.0.1', port: Number(port) } });
try {
  const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
  const completed = await queue.getCompleted(0, 10);
  console.log(JSON.stringify({ counts, completed: completed.map((j) => ({ id: j.id, returnvalue: j.returnvalue })) }));
} finally {
  await queue.close();
}
