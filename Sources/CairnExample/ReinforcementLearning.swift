import Cairn
import CairnCore
import Foundation

// A small reinforcement-learning job shaped like the lecture's: simulation tasks produce
// rollouts, a policy actor trains on them, nested tasks do the work, and `wait` takes the
// first results. The policy is a durable actor: its messages are logged and its state
// checkpointed under `.cairn/` in the working directory, so it survives the cluster's restart
// at the end of the run, and a second run resumes training where the first stopped.
//
// The environment: a point on a line must be driven to 0. The policy is linear,
// action = clamp(w0 * x + w1 * v + w2), and is trained with evolution strategies: each
// rollout task scores the policy with its weights perturbed by seeded noise, running its
// episodes as nested tasks; the actor moves its weights toward the perturbations that scored best.

/// The policy's weights plus the noise a rollout adds to them.
struct Perturbation: Codable, Sendable {
    var seed: UInt64
    var sigma: Double
}

/// What a rollout reports: which perturbation, and the mean return of its episodes.
struct Rollout: Codable, Sendable {
    var seed: UInt64
    var meanReturn: Double
}

/// The policy actor: holds the weights, hands them out, and trains on rollouts.
struct Policy: RemoteActor {
    enum Message: Codable, Sendable {
        case weights
        case train([Rollout])
    }

    var weights: [Double] = [0, 0, 0]
    var version = 0
    var learningRate = 0.3

    mutating func receive(_ message: Message) throws -> [Double] {
        switch message {
        case .weights:
            return weights
        case .train(let rollouts):
            // Evolution strategies: step along the noise, weighted by normalized returns.
            let returns = rollouts.map(\.meanReturn)
            let mean = returns.reduce(0, +) / Double(returns.count)
            let spread = max(1e-6, (returns.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(returns.count)).squareRoot())
            var step = [Double](repeating: 0, count: weights.count)
            for r in rollouts {
                let noise = Environment.noise(seed: r.seed, count: weights.count)
                for i in step.indices { step[i] += (r.meanReturn - mean) / spread * noise[i] }
            }
            for i in weights.indices { weights[i] += learningRate / Double(rollouts.count) * step[i] }
            version += 1
            return weights
        }
    }
}

enum Environment {
    /// Seeded standard-normal noise.
    static func noise(seed: UInt64, count: Int) -> [Double] {
        var rng = SeededGenerator(seed: seed)
        return (0..<count).map { _ in
            let u1 = max(Double(rng.next() >> 11) / Double(1 << 53), 1e-12)
            let u2 = Double(rng.next() >> 11) / Double(1 << 53)
            return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
        }
    }

    /// One episode: 100 steps from a seeded start; the return is minus the mean distance to 0.
    static func episode(weights: [Double], seed: UInt64) -> Double {
        var rng = SeededGenerator(seed: seed)
        var x = Double(rng.next() % 4000) / 1000 - 2
        var v = 0.0
        var total = 0.0
        for _ in 0..<100 {
            let action = max(-1, min(1, weights[0] * x + weights[1] * v + weights[2]))
            v = 0.9 * v + 0.1 * action
            x += 0.1 * v
            total -= abs(x)
        }
        return total / 100
    }
}

/// One episode, as a task: (weights, episode seed) → return.
let episodeTask = RemoteFunction2<[Double], UInt64, Double>("rl.episode") { weights, seed in
    Environment.episode(weights: weights, seed: seed)
}

/// A rollout: perturbs the weights it is given (a future from the policy actor: a data edge),
/// runs four episodes as nested tasks (control edges), and waits for them.
let rolloutTask = RemoteFunction2<[Double], Perturbation, Rollout>("rl.rollout") { weights, p in
    let noise = Environment.noise(seed: p.seed, count: weights.count)
    let perturbed = zip(weights, noise).map { $0 + p.sigma * $1 }
    let episodes = try (0..<4).map { i in try episodeTask.remote(perturbed, p.seed &* 31 &+ UInt64(i)) }
    let returns = try episodes.map { try $0.get() }
    return Rollout(seed: p.seed, meanReturn: returns.reduce(0, +) / Double(returns.count))
}

/// Scores the current weights without noise, on 32 fixed episodes, in parallel.
func evaluate(_ weights: ObjectRef<[Double]>, on cluster: Cluster) async throws -> Double {
    let scores = try (0..<32).map { try episodeTask.remote(weights, 1_000_000 + UInt64($0)) }
    return try await cluster.get(scores).reduce(0, +) / 32
}

func runReinforcementLearning(seed: UInt64) async throws {
    print("reinforcement learning on an embedded 4-node cluster (seed \(seed))")
    let started = Date()
    let options = ClusterOptions.uniform(nodes: 4, storage: ActorStorageOptions(location: .directory(".cairn")))
    let durability = DurabilityOptions(checkpoint: .every(messages: 10))
    let cluster = try await Cluster.local(options)
    // Created on the first run; restored from its checkpoint and log on later ones.
    let policy = try await cluster.spawn(Policy(), name: "rl-policy", durability: durability)
    let status = try await cluster.status(of: policy)
    print("durable policy actor \"rl-policy\" on \(status.node): log position \(status.logPosition)\(status.logPosition > 0 ? " (restored from .cairn/; delete it to start over)" : " (new)")")
    var rng = SeededGenerator(seed: seed)
    let sigma = 0.3

    let initial = try await evaluate(try policy.send(.weights), on: cluster)
    print(String(format: "before training: mean return %.3f", initial))
    var trained = try policy.send(.weights)
    for iteration in 1...15 {
        // The weights are a future: rollouts start as soon as the actor answers.
        let weights = try policy.send(.weights)
        let rollouts = try (0..<24).map { _ in try rolloutTask.remote(weights, Perturbation(seed: rng.next(), sigma: sigma)) }
        // Train on the first 16 to finish; the stragglers are cancelled if they have not started.
        let (ready, late) = try await cluster.wait(rollouts, count: 16, timeout: .seconds(30))
        for r in late { cluster.cancel(r) }
        let batch = try await cluster.get(ready)
        trained = try policy.send(.train(batch))
        if iteration % 5 == 0 {
            let score = try await evaluate(trained, on: cluster)
            let w = try await cluster.get(trained)
            print(String(format: "iteration %2d: mean return %.3f  weights [%@]", iteration, score,
                         w.map { String(format: "%.2f", $0) }.joined(separator: ", ")))
        }
    }
    let final = try await evaluate(trained, on: cluster)
    let weights = try await cluster.get(trained)
    print(String(format: "after training: mean return %.3f (from %.3f); %.0f ms", final, initial, Date().timeIntervalSince(started) * 1000))
    cluster.shutdown()

    // A new cluster on the same storage: the policy comes back from its checkpoint plus the log after it.
    let t0 = Date()
    let restarted = try await Cluster.local(options)
    defer { restarted.shutdown() }
    let restored = try await restarted.spawn(Policy(), name: "rl-policy", durability: durability)
    let back = try await restarted.get(restored.send(.weights))
    let m = restarted.metrics
    print(String(format: "restarted the cluster: policy restored in %.0f ms (%d logged messages replayed), weights %@",
                 Date().timeIntervalSince(t0) * 1000, m.messagesReplayed, back == weights ? "identical" : "DIFFERENT"))
    guard back == weights else { throw CairnError(.storage, "the restored policy differs from the trained one") }
}
