import CairnCodec
import CairnCore
import Foundation
import Testing

struct Row: Codable, Equatable {
    var id: Int
    var timestamp: Int64
    var name: String
    var score: Double
    var active: Bool
}

enum Shape: Codable, Equatable {
    case circle(radius: Double)
    case rect(Double, Double)
    case labelled(String, inner: [Shape])
    case empty
}

struct Everything: Codable, Equatable {
    var i8: Int8 = .min
    var i16: Int16 = .max
    var i32: Int32 = .min
    var i64: Int64 = .min
    var u8: UInt8 = .max
    var u16: UInt16 = 7
    var u32: UInt32 = .max
    var u64: UInt64 = .max
    var int: Int = -1
    var uint: UInt = 0
    var float: Float = -1.5
    var double: Double = .pi
    var bool = true
    var text = "héllo, wörld ✓ 🪨"
    var empty = ""
    var optionalSome: Int? = 4
    var optionalNone: String?
    var bytes: [UInt8] = [0, 1, 2, 255]
    var data = Data([9, 8, 7])
    var ints = [1, -2, 3]
    var nested: [[String]] = [["a"], [], ["b", "c"]]
    var dictionary: [String: Int] = ["one": 1, "two": 2]
    var intKeyed: [Int: String] = [1: "x", -5: "y"]
    var shapes: [Shape] = [.circle(radius: 2), .rect(1, 2), .labelled("l", inner: [.empty]), .empty]
    var infinity = Double.infinity
}

/// A newer version of `Row` with one more optional field.
struct RowV2: Codable, Equatable {
    var id: Int
    var timestamp: Int64
    var name: String
    var score: Double
    var active: Bool
    var comment: String?
}

@Suite("Binary codec")
struct BinaryCodecTests {
    let encoder = BinaryEncoder()
    let decoder = BinaryDecoder()

    func roundTrip<T: Codable & Equatable>(_ value: T) throws {
        let bytes = try encoder.encode(value)
        let back = try decoder.decode(T.self, from: bytes)
        #expect(back == value)
    }

    @Test("round trip: every primitive, optional, collection and enum shape")
    func roundTripEverything() throws {
        try roundTrip(Everything())
        try roundTrip(Row(id: 1, timestamp: -9, name: "x", score: 0.25, active: false))
        try roundTrip([Shape.empty, .circle(radius: -0.0)])
        try roundTrip(42)
        try roundTrip("top-level string")
        try roundTrip([UInt8]())
        try roundTrip([Int]())
        try roundTrip(Optional<Int>.none)
        try roundTrip([Int?](arrayLiteral: 1, nil, 3))
    }

    @Test("round trip: containers longer than 127 and 16383 bytes have their lengths widened")
    func largeContainers() throws {
        let rows = (0..<5000).map { Row(id: $0, timestamp: Int64($0) * 1_000_003, name: "row \($0)", score: Double($0) / 3, active: $0 % 2 == 0) }
        try roundTrip(rows)
        try roundTrip(String(repeating: "z", count: 70_000))
        try roundTrip(Array(repeating: [UInt8](repeating: 3, count: 200), count: 3))
    }

    @Test("round trip: a value of 40 MiB keeps every byte while its buffer grows by copying and then by remapping")
    func bufferGrowsPastEveryThreshold() throws {
        // 640 chunks of 64 KiB, like an actor's large state: the encoder's buffer passes 1 MiB,
        // then 32 MiB (above which it is grown by `realloc` instead of a copy of its own).
        var rng = SeededGenerator(seed: 7)
        let chunks = (0..<640).map { _ in rng.bytes(64 << 10) }
        let bytes = try encoder.encode(chunks)
        #expect(bytes.count > 40 << 20)
        let back = try decoder.decode([[UInt8]].self, from: bytes)
        #expect(back == chunks)
    }

    @Test("round trip: seeded random rows", arguments: [1 as UInt64, 2, 3])
    func randomRows(seed: UInt64) throws {
        var rng = SeededGenerator(seed: seed)
        let rows = (0..<500).map { _ in
            Row(id: Int.random(in: .min ... .max, using: &rng), timestamp: Int64.random(in: .min ... .max, using: &rng),
                name: String(decoding: rng.bytes(Int.random(in: 0..<40, using: &rng)).map { $0 % 94 + 32 }, as: UTF8.self),
                score: Double(bitPattern: rng.next()).isNaN ? 0 : Double(bitPattern: rng.next() & 0x7FEF_FFFF_FFFF_FFFF),
                active: Bool.random(using: &rng))
        }
        try roundTrip(rows)
    }

    @Test("versioning: a newer reader fills an added optional field with nil; an older reader skips it")
    func versioning() throws {
        let old = Row(id: 7, timestamp: 8, name: "n", score: 1, active: true)
        let upgraded = try decoder.decode(RowV2.self, from: encoder.encode(old))
        #expect(upgraded == RowV2(id: 7, timestamp: 8, name: "n", score: 1, active: true, comment: nil))
        let newer = RowV2(id: 1, timestamp: 2, name: "m", score: 3, active: false, comment: "extra")
        let downgraded = try decoder.decode(Row.self, from: encoder.encode(newer))
        #expect(downgraded == Row(id: 1, timestamp: 2, name: "m", score: 3, active: false))
    }

    @Test("the encoding is compact: a row of small numbers takes well under its JSON size")
    func compact() throws {
        let row = Row(id: 5, timestamp: 6, name: "ab", score: 0.5, active: true)
        let binary = try encoder.encode(row)
        let json = try JSONEncoder().encode(row)
        #expect(binary.count < json.count)
    }

    @Test("errors: wrong type, missing key, out-of-range number, bad header and trailing bytes are typed")
    func typedErrors() throws {
        func code<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) -> CodecError.Code? {
            do {
                _ = try decoder.decode(type, from: bytes)
                return nil
            } catch let error as CodecError {
                return error.code
            } catch {
                Issue.record("untyped error \(error)")
                return nil
            }
        }
        #expect(code(Int.self, try encoder.encode("text")) == .typeMismatch)
        #expect(code(Row.self, try encoder.encode(["id": 1])) == .keyNotFound)
        #expect(code(Int8.self, try encoder.encode(300)) == .valueOutOfRange)
        #expect(code(UInt.self, try encoder.encode(-1)) == .valueOutOfRange)
        #expect(code(Int.self, [0x7B, 1, 3, 2]) == .badMagic)
        #expect(code(Int.self, [0xCA, 9, 3, 2]) == .unsupportedVersion)
        #expect(code(Int.self, [0xCA]) == .truncated)
        #expect(code(Int.self, try encoder.encode(1) + [0]) == .trailingBytes)
        #expect(code(String.self, [0xCA, 1, 0x07, 2, 0xFF, 0xFE]) == .invalidUTF8)
        #expect(code(String.self, [0xCA, 1, 0x07, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) == .lengthMismatch)
        #expect(code(Int.self, [0xCA, 1, 0x03] + [UInt8](repeating: 0xFF, count: 11)) == .valueOutOfRange)
        #expect(code(Int.self, [0xCA, 1, 0x3F]) == .unknownTag)
        // An array that claims a billion elements in 3 bytes is refused before anything is allocated.
        #expect(code([Int].self, [0xCA, 1, 0x09, 5, 0x80, 0x94, 0xEB, 0xDC, 0x03]) == .lengthMismatch)
    }

    @Test("errors name the coding path of the bad field")
    func errorPath() throws {
        struct Outer: Codable { var rows: [Row] }
        struct LooseRow: Codable { var id: String; var timestamp: Int64; var name: String; var score: Double; var active: Bool }
        struct LooseOuter: Codable { var rows: [LooseRow] }
        let bytes = try encoder.encode(LooseOuter(rows: [LooseRow(id: "1", timestamp: 0, name: "", score: 0, active: true)]))
        #expect(throws: CodecError.self) { try decoder.decode(Outer.self, from: bytes) }
        do {
            _ = try decoder.decode(Outer.self, from: bytes)
        } catch let error as CodecError {
            #expect(error.code == .typeMismatch)
            #expect(error.path == "rows[0].id")
        }
    }

    @Test("errors and init(from:) see array positions and keys in order, through nested arrays")
    func nestedErrorPath() throws {
        struct Group: Codable { var rows: [[Row]] }
        struct LooseRow: Codable { var id: String; var timestamp: Int64; var name: String; var score: Double; var active: Bool }
        struct LooseGroup: Codable { var rows: [[LooseRow]] }
        let good = LooseRow(id: "1", timestamp: 0, name: "", score: 0, active: true)
        // Only the second row list's first row has a string id; numbers elsewhere.
        struct Mixed: Encodable {
            var groups: [LooseGroupOrGroup]
        }
        enum LooseGroupOrGroup: Encodable {
            case good(Group), bad(LooseGroup)
            func encode(to encoder: any Encoder) throws {
                switch self {
                case .good(let g): try g.encode(to: encoder)
                case .bad(let g): try g.encode(to: encoder)
                }
            }
        }
        struct Strict: Decodable { var groups: [Group] }
        let row = Row(id: 1, timestamp: 0, name: "", score: 0, active: true)
        let bytes = try encoder.encode(Mixed(groups: [.good(Group(rows: [[row]])), .bad(LooseGroup(rows: [[], [good]]))]))
        do {
            _ = try decoder.decode(Strict.self, from: bytes)
            Issue.record("a string id decoded as an Int")
        } catch let error as CodecError {
            #expect(error.code == .typeMismatch)
            #expect(error.path == "groups[1].rows[1][0].id")
        }

        // A type asking for its coding path while it decodes sees the same path.
        struct Probe: Decodable {
            var path: String
            init(from decoder: any Decoder) throws {
                path = decoder.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            }
        }
        struct Probes: Decodable { var a: [[Probe]] }
        struct Empties: Encodable { var a: [[[String: Int]]] }
        let probes = try decoder.decode(Probes.self, from: try encoder.encode(Empties(a: [[[:]], [[:], [:]]])))
        #expect(probes.a.map { $0.map(\.path) } == [[".a[0][0]"], [".a[1][0]", ".a[1][1]"]])
    }

    @Test("a type that catches a field's error goes on reading its other fields correctly")
    func caughtFieldError() throws {
        struct Inner: Codable { var x: Int }
        struct LooseInner: Codable { var x: String }
        struct Written: Codable { var a: LooseInner; var b: Int; var c: String }
        struct Tolerant: Decodable {
            enum CodingKeys: String, CodingKey { case a, b, c }
            var a: Inner?
            var b: Int
            var c: String
            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                a = try? container.decode(Inner.self, forKey: .a)
                b = try container.decode(Int.self, forKey: .b)
                c = try container.decode(String.self, forKey: .c)
            }
        }
        let bytes = try encoder.encode(Written(a: LooseInner(x: "not a number"), b: 42, c: "after"))
        let value = try decoder.decode(Tolerant.self, from: bytes)
        #expect(value.a == nil)
        #expect(value.b == 42)
        #expect(value.c == "after")
    }

    @Test("nesting deeper than the limit is refused, not recursed into")
    func nestingLimit() throws {
        indirect enum Chain: Codable { case end, link(Chain) }
        var chain = Chain.end
        for _ in 0..<100 { chain = .link(chain) }
        let bytes = try encoder.encode(chain)
        #expect(throws: CodecError.self) { try BinaryDecoder(maxDepth: 50).decode(Chain.self, from: bytes) }
        _ = try BinaryDecoder(maxDepth: 500).decode(Chain.self, from: bytes)
        // Hostile: 100,000 nested array openings.
        var hostile: [UInt8] = [0xCA, 1]
        for _ in 0..<100_000 { hostile += [0x09, 0x7F, 0x01] }
        #expect(throws: CodecError.self) { try decoder.decode([[[[[[[[[[Int]]]]]]]]]].self, from: hostile) }
    }

    @Test("interleaved writes to sibling containers are rejected with a typed error")
    func interleavedContainers() throws {
        struct Interleaving: Encodable {
            enum K: CodingKey { case a, b }
            func encode(to encoder: any Encoder) throws {
                var c = encoder.container(keyedBy: K.self)
                var a = c.nestedUnkeyedContainer(forKey: .a)
                try a.encode(1)
                var b = c.nestedUnkeyedContainer(forKey: .b)
                try b.encode(2)
                try a.encode(3)
            }
        }
        #expect(throws: CodecError.self) { try encoder.encode(Interleaving()) }
    }

    /// 100,000 seeded inputs: mutations of valid documents and pure noise. Each either decodes
    /// or throws a `CodecError`; a crash or hang fails the run, any other error type is recorded.
    @Test("reused containers: a recursive type, the same key type at several depths, decodes whole")
    func recursiveTreeRoundTrips() throws {
        func tree(_ depth: Int, _ label: String) -> Tree {
            Tree(label: label, weight: depth, children: depth == 0 ? [] : (0..<3).map { tree(depth - 1, label + "." + String($0)) })
        }
        try roundTrip(tree(4, "root"))
    }

    @Test("reused containers: fields in another order than the reader declares are found by name")
    func fieldOrderDiffers() throws {
        let rows = (0..<50).map { Row(id: $0, timestamp: Int64($0) * -3, name: "r\($0)", score: Double($0) / 4, active: $0 % 2 == 0) }
        let reordered = try decoder.decode([RowReordered].self, from: try encoder.encode(rows))
        #expect(reordered.map { Row(id: $0.id, timestamp: $0.timestamp, name: $0.name, score: $0.score, active: $0.active) } == rows)
        let back = try decoder.decode([Row].self, from: try encoder.encode(reordered))
        #expect(back == rows)
    }

    @Test("reused containers: a type with more coding keys than the name table holds round trips")
    func manyKeysRoundTrip() throws {
        var wide = Wide()
        wide.f69 = 69
        wide.f0 = -1
        wide.f64 = 64
        try roundTrip([wide, Wide()])
    }

    @Test("reused containers: a class hierarchy through superEncoder and superDecoder round trips")
    func classHierarchyRoundTrips() throws {
        let values = [Derived(base: 1, extra: "a"), Derived(base: -7, extra: "bb")]
        let back = try decoder.decode([Derived].self, from: try encoder.encode(values))
        #expect(back.map(\.base) == [1, -7])
        #expect(back.map(\.extra) == ["a", "bb"])
    }

    @Test("fuzz: 100,000 random and mutated inputs end in a value or a CodecError")
    func fuzzDecoder() throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_FUZZ_SEED")
        print("codec fuzz seed: \(seed) (replay with CAIRN_FUZZ_SEED=\(seed))")
        var rng = SeededGenerator(seed: seed)
        let samples: [[UInt8]] = [
            try encoder.encode(Everything()),
            try encoder.encode((0..<20).map { Row(id: $0, timestamp: -Int64($0), name: "r\($0)", score: 1.5, active: true) }),
            try encoder.encode([Shape.labelled("x", inner: [.rect(1, 2), .circle(radius: 3)])]),
        ]
        var decoded = 0
        var rejected = 0
        for round in 0..<100_000 {
            var input: [UInt8]
            if round % 10 == 9 {
                input = [0xCA, 1] + rng.bytes(Int.random(in: 0..<64, using: &rng))
            } else {
                input = samples[round % samples.count]
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    switch Int.random(in: 0..<4, using: &rng) {
                    case 0: input[Int.random(in: 0..<input.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                    case 1: input.removeLast(Int.random(in: 0..<input.count, using: &rng))
                    case 2: input.insert(UInt8.random(in: 0...255, using: &rng), at: Int.random(in: 0...input.count, using: &rng))
                    default: input[Int.random(in: 0..<input.count, using: &rng)] = [0x00, 0x7F, 0x80, 0xFF].randomElement(using: &rng)!
                    }
                    if input.isEmpty { input = [0xCA] }
                }
            }
            for attempt in 0..<3 {
                do {
                    switch (round + attempt) % 3 {
                    case 0: _ = try decoder.decode(Everything.self, from: input)
                    case 1: _ = try decoder.decode([Row].self, from: input)
                    default: _ = try decoder.decode([Shape].self, from: input)
                    }
                    decoded += 1
                } catch is CodecError {
                    rejected += 1
                } catch {
                    Issue.record("seed \(seed) round \(round): untyped error \(error)")
                }
            }
        }
        #expect(rejected > 200_000)
        #expect(decoded + rejected == 300_000)
    }
}

struct Tree: Codable, Equatable {
    var label: String
    var weight: Int
    var children: [Tree]
}

/// `Row`'s fields, declared (and so written and read) in another order.
struct RowReordered: Codable, Equatable {
    var active: Bool
    var score: Double
    var name: String
    var timestamp: Int64
    var id: Int
}

class Base: Codable {
    var base: Int
    init(base: Int) { self.base = base }
}

final class Derived: Base {
    var extra: String
    enum CodingKeys: String, CodingKey { case extra }
    init(base: Int, extra: String) {
        self.extra = extra
        super.init(base: base)
    }
    required init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        extra = try container.decode(String.self, forKey: .extra)
        try super.init(from: container.superDecoder())
    }
    override func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(extra, forKey: .extra)
        try super.encode(to: container.superEncoder())
    }
}

/// More coding keys (70) than a reused container's name table has entries (64).
struct Wide: Codable, Equatable {
    var f0 = 0
    var f1 = 3
    var f2 = 6
    var f3 = 9
    var f4 = 12
    var f5 = 15
    var f6 = 18
    var f7 = 21
    var f8 = 24
    var f9 = 27
    var f10 = 30
    var f11 = 33
    var f12 = 36
    var f13 = 39
    var f14 = 42
    var f15 = 45
    var f16 = 48
    var f17 = 51
    var f18 = 54
    var f19 = 57
    var f20 = 60
    var f21 = 63
    var f22 = 66
    var f23 = 69
    var f24 = 72
    var f25 = 75
    var f26 = 78
    var f27 = 81
    var f28 = 84
    var f29 = 87
    var f30 = 90
    var f31 = 93
    var f32 = 96
    var f33 = 99
    var f34 = 102
    var f35 = 105
    var f36 = 108
    var f37 = 111
    var f38 = 114
    var f39 = 117
    var f40 = 120
    var f41 = 123
    var f42 = 126
    var f43 = 129
    var f44 = 132
    var f45 = 135
    var f46 = 138
    var f47 = 141
    var f48 = 144
    var f49 = 147
    var f50 = 150
    var f51 = 153
    var f52 = 156
    var f53 = 159
    var f54 = 162
    var f55 = 165
    var f56 = 168
    var f57 = 171
    var f58 = 174
    var f59 = 177
    var f60 = 180
    var f61 = 183
    var f62 = 186
    var f63 = 189
    var f64 = 192
    var f65 = 195
    var f66 = 198
    var f67 = 201
    var f68 = 204
    var f69 = 207
}
